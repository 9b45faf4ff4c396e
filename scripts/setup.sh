#!/usr/bin/env bash
# Installs what building and running redis-raft needs, and nothing when it is all there.
#
#   scripts/setup.sh
#
# On Debian/Ubuntu it installs the missing packages with apt-get (through sudo when not
# root); `apt-get update` runs only when something has to be installed. It never installs
# Rust itself: it checks that `cargo` is on PATH and says how to get it if not. For the fuzz
# targets (scripts/fuzz.sh, and test.sh's short run) it adds rustup's nightly toolchain and
# cargo-fuzz when they are missing.
# Silent when everything is present, so other scripts can call it on every run.
set -euo pipefail

# redis-server/redis-tools: the server the module loads into, redis-cli, redis-benchmark.
# libclang-dev/clang: bindgen (redis-module's build). protobuf-compiler: raft-proto's build.
# python3-venv: a venv (target/pyvenv) with redis-py from PyPI for the cluster-client test.
# openssl: certificates for scripts/tls-bench.sh (the build needs none: rustls with ring).
PACKAGES=(redis-server redis-tools libclang-dev clang protobuf-compiler python3-venv openssl)

die() {
    echo "setup.sh: $*" >&2
    exit 1
}

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
else
    # Not Debian: we cannot install, but we can say what is missing by its commands.
    for c in redis-server redis-cli redis-benchmark clang protoc; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    if ((${#missing[@]})); then
        die "missing: ${missing[*]} (and libclang for bindgen). This script installs them only on Debian/Ubuntu; install them with your package manager."
    fi
fi

if ((${#missing[@]})); then
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to install: ${missing[*]}"
        sudo=(sudo)
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    ${sudo[@]+"${sudo[@]}"} apt-get update -qq >/dev/null
    ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    for p in "${missing[@]}"; do
        is_installed "$p" || die "apt-get did not install $p"
    done
fi

if ! command -v cargo >/dev/null 2>&1; then
    [[ -x "$HOME/.cargo/bin/cargo" ]] &&
        die "cargo is in $HOME/.cargo/bin but not on PATH: run 'source \$HOME/.cargo/env' (or add it to PATH) and retry"
    die "cargo not found: install a Rust toolchain (https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then retry"
fi

# Fuzzing: libFuzzer's instrumentation needs a nightly compiler; cargo-fuzz drives it.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 ||
        die "the fuzz targets need a nightly Rust toolchain, and rustup is not here to install one"
    echo "setup.sh: installing the nightly Rust toolchain (rustup, minimal profile)" >&2
    rustup toolchain install nightly --profile minimal >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup.sh: installing cargo-fuzz (cargo install --locked)" >&2
    cargo install cargo-fuzz --locked --quiet
fi
