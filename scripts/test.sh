#!/usr/bin/env bash
# Builds the module and runs every test: unit tests, and the integration tests in tests/,
# which start real redis-server processes with the module `cargo test` builds
# (target/release/deps/libredis_raft.so, found from the test binary's own path, so the build
# profile here must be release).
#
#   scripts/test.sh [extra cargo test filter/args before --]
#
# REDIS_SERVER=/path/to/redis-server (or valkey-server) runs the integration tests against
# that server instead of the redis-server on PATH (Debian's 7.0.15 is the reference).
#
# Then, when no filter was given, every fuzz target runs for FUZZ_SECONDS (default 3; 0
# skips it) from its seeds and saved corpus: a short bounded smoke run (scripts/fuzz.sh;
# the first build of fuzz/ takes a few minutes, later ones seconds).
#
# Exits non-zero if the build or any test fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release
# Two threads: each integration test runs a cluster of redis-servers, and the machine may
# have only two cores; more in parallel makes elections time out.
cargo test --release "$@" -- --test-threads=2
if (($# == 0)) && ((${FUZZ_SECONDS:-3} > 0)); then
    scripts/fuzz.sh "${FUZZ_SECONDS:-3}"
fi
