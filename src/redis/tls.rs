//! `raft.tls-enabled`: reads Redis's own certificate settings (`tls-cert-file`, `tls-key-file`,
//! `tls-ca-cert-file` / `tls-ca-cert-dir`, `tls-client-cert-file` / `tls-client-key-file`)
//! at load and again after every CONFIG SET, as RedisRaft does, and keeps the bus's TLS
//! configuration (`crate::tls`) up to date. New connections use the newest files; open ones
//! keep theirs. Main thread only.

use std::sync::{Mutex, OnceLock};

use super::api::{self, RedisModuleCtx};
use crate::tls::{TlsFiles, TlsHandle};

/// Set at load when `raft.tls-enabled` is yes (the option is fixed at start).
static HANDLE: OnceLock<TlsHandle> = OnceLock::new();
/// The settings the configuration in force was built from.
static FILES: Mutex<Option<TlsFiles>> = Mutex::new(None);

/// One of Redis's settings by CONFIG GET ("" when unset or unknown).
fn config_get(ctx: *mut RedisModuleCtx, name: &str) -> String {
    let argv = [
        b"CONFIG".to_vec(),
        b"GET".to_vec(),
        name.as_bytes().to_vec(),
    ];
    match api::call_value(ctx, &argv) {
        api::Value::Array(kv) => match kv.get(1) {
            Some(api::Value::Str(v)) => String::from_utf8_lossy(v).into_owned(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

fn read_files(ctx: *mut RedisModuleCtx) -> TlsFiles {
    TlsFiles {
        cert_file: config_get(ctx, "tls-cert-file"),
        key_file: config_get(ctx, "tls-key-file"),
        ca_cert_file: config_get(ctx, "tls-ca-cert-file"),
        ca_cert_dir: config_get(ctx, "tls-ca-cert-dir"),
        client_cert_file: config_get(ctx, "tls-client-cert-file"),
        client_key_file: config_get(ctx, "tls-client-key-file"),
        key_file_pass: !config_get(ctx, "tls-key-file-pass").is_empty(),
    }
}

/// At load: with `raft.tls-enabled yes`, builds the TLS configuration; Err (the module
/// refuses to load) when the files are missing or wrong.
pub fn load(ctx: *mut RedisModuleCtx, enabled: bool) -> Result<(), String> {
    if !enabled {
        return Ok(());
    }
    let files = read_files(ctx);
    let cfg = crate::tls::build(&files)?;
    let _ = HANDLE.set(TlsHandle::new(cfg));
    *FILES.lock().unwrap_or_else(|e| e.into_inner()) = Some(files);
    tracing::info!("raft bus: TLS 1.3 with certificates from Redis's tls-* settings");
    Ok(())
}

/// The bus's TLS configuration; None when `raft.tls-enabled` is no.
pub fn handle() -> Option<TlsHandle> {
    HANDLE.get().cloned()
}

/// The settings in force (RAFT.CLUSTER JOIN's client uses them too); None without TLS.
pub fn files() -> Option<TlsFiles> {
    FILES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// After any CONFIG SET: reads the files again (their contents may have changed under the
/// same names). A failure keeps the configuration in force and is logged.
pub fn refresh(ctx: *mut RedisModuleCtx) {
    let Some(handle) = HANDLE.get() else {
        return;
    };
    let files = read_files(ctx);
    match crate::tls::build(&files) {
        Ok(cfg) => {
            handle.set(cfg);
            let mut current = FILES.lock().unwrap_or_else(|e| e.into_inner());
            if current.as_ref() != Some(&files) {
                tracing::info!("raft bus: TLS certificates reloaded after CONFIG SET; new connections use them");
            }
            *current = Some(files);
        }
        Err(e) => tracing::warn!(
            "raft bus: keeping the TLS certificates in force: the new tls-* settings are refused: {e}"
        ),
    }
}
