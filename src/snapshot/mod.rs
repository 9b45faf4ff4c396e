//! Snapshot files of the Redis dataset: the file format (`format`), saving one from a forked
//! child (`save`), and loading one into the live dataset in slices (`load`).
//!
//! This is the foundation the Raft side builds on (log compaction, sending snapshots to
//! followers, restart from a snapshot); it knows nothing about Raft beyond carrying an index,
//! a term and an opaque metadata blob in the file's header.

pub mod format;
pub mod load;
pub mod save;
