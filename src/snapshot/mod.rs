//! Snapshot files of the Redis dataset: the file format (`format`), saving one from a forked
//! child (`save`), and loading one into the live dataset in slices (`load`).
//!
//! This is the foundation the Raft side builds on (log compaction, sending snapshots to
//! followers, restart from a snapshot); it knows nothing about Raft beyond carrying an index,
//! a term and an opaque metadata blob (`format::SnapshotHeader`) in the file.
//!
//! # Using it from the Raft side
//!
//! All of `save` and `load` runs on Redis's main thread; callbacks are called there too.
//!
//! - Taking a snapshot at applied index `i`, term `t`: right after applying entry `i` (so the
//!   fork sees exactly that state), call `save::start_save(ctx, path, SnapshotHeader { index: i,
//!   term: t, meta }, on_done)`. It returns once the child is forked; `on_done` later gets a
//!   `SaveOutcome` (keys, bytes, duration, fork stall) once `path` is durably replaced, or a
//!   `SaveError` with `path` untouched. `save::save_in_progress`, `save::abort_save`.
//!   Redis allows one child process at a time: a save fails with `SaveError::Fork` while a
//!   BGSAVE, an AOF rewrite or a load's module-type check runs.
//! - Sending a snapshot: the file is immutable once installed; `format::inspect(path)` gives
//!   its header, key count and size cheaply. A receiver writes the bytes to a temporary file,
//!   fsyncs it, checks it with `format::verify` and publishes it with `format::install`.
//! - Installing: `load::start_load(ctx, path, LoadOptions::default(), on_progress, on_done)`.
//!   The file is fully checked before the dataset is touched (`LoadError::Invalid` or
//!   `LoadError::ModuleTypes`: nothing changed). Then the dataset is flushed and restored in
//!   slices; between slices Redis serves clients, so the caller must keep them off the data
//!   (-LOADING) and apply no entries until `on_done` says `Ok(LoadOutcome)`, whose `header`
//!   is the position to continue from. `LoadError::Restore` / `Aborted` mean the dataset holds
//!   part of the snapshot (`LoadError::dataset_changed`). `load::load_in_progress`,
//!   `load::abort_load`.
//! - Reading one directly (tests, tools): `format::SnapshotReader` iterates over the keys and
//!   ends with an error if the file is truncated or damaged.

pub mod format;
pub mod load;
pub mod save;
