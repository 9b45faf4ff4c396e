/* A tiny third-party module for tests: COUNTER.INCRBY key n (a write) and COUNTER.GET key
 * (a read), to check that redis-raft classifies commands of modules loaded after it. */
#include "redismodule.h"

static int incrby(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    RedisModuleCallReply *r = RedisModule_Call(ctx, "INCRBY", "ss", argv[1], argv[2]);
    return RedisModule_ReplyWithCallReply(ctx, r);
}

static int get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    RedisModuleCallReply *r = RedisModule_Call(ctx, "GET", "s", argv[1]);
    return RedisModule_ReplyWithCallReply(ctx, r);
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "counter", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "counter.incrby", incrby, "write", 1, 1, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "counter.get", get, "readonly", 1, 1, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
