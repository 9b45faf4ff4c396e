#![no_main]
//! See `redis_raft::fuzzing::bus_frames`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| redis_raft_fuzz::run(data, redis_raft::fuzzing::bus_frames));
