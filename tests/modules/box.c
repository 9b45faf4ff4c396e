/* A tiny module with its own data type, for snapshot tests: BOX.SET key value (a write)
 * and BOX.GET key (a read) on keys of type "rraft-box", saved and loaded through RDB
 * callbacks, so DUMP/RESTORE of its keys goes through the module. */
#include "redismodule.h"

static RedisModuleType *BoxType;

static void *box_rdb_load(RedisModuleIO *rdb, int encver) {
    if (encver != 0) return NULL;
    return RedisModule_LoadString(rdb);
}

static void box_rdb_save(RedisModuleIO *rdb, void *value) {
    RedisModule_SaveString(rdb, value);
}

static void box_free(void *value) {
    RedisModule_FreeString(NULL, value);
}

static int box_set(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RedisModule_WrongArity(ctx);
    RedisModuleKey *key = RedisModule_OpenKey(ctx, argv[1], REDISMODULE_READ | REDISMODULE_WRITE);
    int type = RedisModule_KeyType(key);
    if (type != REDISMODULE_KEYTYPE_EMPTY && RedisModule_ModuleTypeGetType(key) != BoxType) {
        RedisModule_CloseKey(key);
        return RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
    }
    RedisModuleString *v = RedisModule_CreateStringFromString(NULL, argv[2]);
    RedisModule_ModuleTypeSetValue(key, BoxType, v);
    RedisModule_CloseKey(key);
    return RedisModule_ReplyWithSimpleString(ctx, "OK");
}

static int box_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return RedisModule_WrongArity(ctx);
    RedisModuleKey *key = RedisModule_OpenKey(ctx, argv[1], REDISMODULE_READ);
    if (RedisModule_KeyType(key) == REDISMODULE_KEYTYPE_EMPTY) {
        RedisModule_CloseKey(key);
        return RedisModule_ReplyWithNull(ctx);
    }
    if (RedisModule_ModuleTypeGetType(key) != BoxType) {
        RedisModule_CloseKey(key);
        return RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
    }
    RedisModuleString *v = RedisModule_ModuleTypeGetValue(key);
    RedisModule_ReplyWithString(ctx, v);
    RedisModule_CloseKey(key);
    return REDISMODULE_OK;
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "box", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) return REDISMODULE_ERR;
    RedisModuleTypeMethods tm = {
        .version = REDISMODULE_TYPE_METHOD_VERSION,
        .rdb_load = box_rdb_load,
        .rdb_save = box_rdb_save,
        .free = box_free,
    };
    BoxType = RedisModule_CreateDataType(ctx, "rraft-box", 0, &tm);
    if (BoxType == NULL) return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "box.set", box_set, "write deny-oom", 1, 1, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "box.get", box_get, "readonly", 1, 1, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
