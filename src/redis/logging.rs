//! Routes `tracing` events (ours and raft-rs's, through tracing-slog) into Redis's log at
//! Redis's levels, filtered by `raft.loglevel`.

use std::io::Write;
use std::sync::atomic::Ordering;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use super::api::log_raw;
use super::configs::LOGLEVEL;
use crate::config::LogLevel;

fn redis_level(l: &Level) -> LogLevel {
    match *l {
        Level::ERROR | Level::WARN => LogLevel::Warning,
        Level::INFO => LogLevel::Notice,
        Level::DEBUG => LogLevel::Verbose,
        Level::TRACE => LogLevel::Debug,
    }
}

fn enabled(meta: &Metadata<'_>) -> bool {
    let min = LogLevel::from_index(i32::from(LOGLEVEL.load(Ordering::Relaxed)))
        .unwrap_or(LogLevel::Notice);
    redis_level(meta.level()) >= min
}

/// Buffers one formatted event and hands it to RedisModule_Log when dropped.
pub struct LineWriter {
    level: LogLevel,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let s = String::from_utf8_lossy(&self.buf);
        let s = s.trim_end();
        if !s.is_empty() {
            log_raw(self.level.name(), s);
        }
    }
}

struct RedisLog;

impl<'a> MakeWriter<'a> for RedisLog {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            level: LogLevel::Notice,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            level: redis_level(meta.level()),
            buf: Vec::new(),
        }
    }
}

/// Field formatting without raft-rs's slog bookkeeping fields (file, line, module path).
fn write_field(
    w: &mut tracing_subscriber::fmt::format::Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    match field.name() {
        n if n.starts_with("slog.") => Ok(()),
        "message" => write!(w, "{value:?} "),
        n => write!(w, "{n}={value:?} "),
    }
}

/// Installs the subscriber for the whole process (once; later calls are no-ops).
pub fn init() {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(RedisLog)
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .fmt_fields(tracing_subscriber::fmt::format::debug_fn(write_field))
        .with_filter(tracing_subscriber::filter::filter_fn(enabled));
    let subscriber = tracing_subscriber::registry().with(layer);
    let _ = tracing::subscriber::set_global_default(subscriber);
}
