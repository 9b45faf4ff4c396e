#!/usr/bin/env bash
# Fuzzes every decoder that reads bytes from outside the process (bus frames and the
# handshake, log files, snapshot files, our entry codec, option values, JOIN's replies):
# one cargo-fuzz target each in fuzz/, entry points in src/fuzzing.rs.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]     (default: 60 s, every target)
#
# Each target starts from its seeds (fuzz/seeds/<target>, made by the real encoders) and what
# earlier runs kept (fuzz/corpus/<target>, not committed), and the inputs that once failed
# (fuzz/regressions/<target>). A crash, a hang (an input taking over 20 s; the slowest
# take milliseconds), an allocation over 8 MiB (fuzz/src/lib.rs) or an RSS over 1 GiB fails
# the run; the input is left in fuzz/artifacts/<target>/ (reproduce it with
# `cargo +nightly fuzz run -s none <target> <file>` in fuzz/; keep it in
# fuzz/regressions/<target>/ and as a unit test once fixed). Prints one line per target
# with its executions and execs/s. Exits non-zero if any target failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
[[ "$seconds" =~ ^[0-9]+$ ]] && ((seconds > 0)) || {
    echo "fuzz.sh: SECONDS_PER_TARGET must be a positive integer, not '$seconds'" >&2
    exit 2
}
shift || true

scripts/setup.sh
# libFuzzer is C++, built by the cc crate with `c++`; where only clang is installed, use it.
if [[ -z "${CXX:-}" ]] && ! command -v c++ >/dev/null 2>&1; then
    export CXX=clang++
fi
cd fuzz
if (($#)); then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

# No sanitizer: the decoders are safe Rust, and instrumenting without ASan builds and runs
# several times faster; debug assertions and overflow checks are on (cargo-fuzz's default).
cargo +nightly fuzz build -s none 2>&1 | grep -v '^ *\(Compiling\|Finished\|Blocking\|Updating\|Locking\|Downloaded\|Downloading\)' || true

bin="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"

# The targets write their files (log, snapshot) under TMPDIR: in memory where there is
# /dev/shm (on a disk busy with other processes' fsyncs, creating a file can stall for seconds,
# which libFuzzer would report as a hang), and removed afterwards.
scratch=$(mktemp -d -p /dev/shm redis-raft-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$scratch/$t.log"
    dirs=("corpus/$t" "seeds/$t")
    [[ -d "regressions/$t" ]] && dirs+=("regressions/$t")
    # The binary itself, not `cargo fuzz run`: built above, and cargo's checks per target
    # would add a second each to test.sh's short runs.
    if TMPDIR="$scratch" "$bin/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=1024 -max_len=16384 \
        -print_final_stats=1 "${dirs[@]}" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        runs=${runs:-0}
        printf 'fuzz.sh: %-14s %9s execs in %3ss (%s execs/s), corpus %s inputs\n' \
            "$t" "$runs" "$seconds" "$((runs / seconds))" "$(find "corpus/$t" -type f | wc -l)"
    else
        failed+=("$t")
        echo "fuzz.sh: $t FAILED; libFuzzer's output:" >&2
        tail -n 40 "$log" >&2
    fi
done
if ((${#failed[@]})); then
    echo "fuzz.sh: failing targets: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
