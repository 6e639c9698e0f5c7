#!/usr/bin/env bash
# How long a user's crate takes to build from scratch with `proxyless`, with
# `default-features = false` and with the default features (everything).
#
# Why: the facade's features exist to make a service that only calls and
# serves through the mesh cheaper to build (no control server, no
# OpenTelemetry / Prometheus, no admin endpoint). tests/lean_build.rs checks
# *what* is compiled on every `cargo test`; this script measures what it
# costs, which takes minutes and so is not part of the test suite.
#
# What it does: copies the workspace's sources (not target/, not .git) to a
# temporary directory, so both builds compile the same code even if the
# checkout changes meanwhile; creates two temporary crates whose main creates
# a `proxyless::Client` (so the client stack is really compiled), each with
# the workspace's Cargo.lock (the same versions, resolved offline); and runs
# `cargo build` for each into a fresh target directory, printing the wall
# time of each. Dependencies come from the local registry cache
# (`--offline`); build the workspace once first if the cache is empty.
# The figures are wall times: on a shared machine, other builds slow them.
#
# Usage: scripts/lean-build-time.sh [extra cargo build args, e.g. --release]
set -euo pipefail

checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo="${CARGO:-cargo}"
work="$(mktemp -d "${TMPDIR:-/tmp}/proxyless-lean-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

root="$work/proxyless"
mkdir -p "$root"
tar -C "$checkout" --exclude=./target --exclude=./.git -cf - . | tar -C "$root" -xf -

# A probe crate named $1 whose proxyless dependency line ends with $2.
make_probe() {
    local dir="$work/$1"
    mkdir -p "$dir/src"
    cat >"$dir/Cargo.toml" <<EOF
[package]
name = "$1"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
proxyless = { path = "$root"$2 }

[workspace]
EOF
    cat >"$dir/src/main.rs" <<'EOF'
//! A service's smallest use of the mesh: a client from the bootstrap.
fn main() -> Result<(), proxyless::Error> {
    let client: proxyless::Client = proxyless::Client::from_env()?;
    drop(client);
    Ok(())
}
EOF
    cp "$root/Cargo.lock" "$dir/Cargo.lock"
}

# Builds probe $1 into a fresh target directory; prints its wall time (s).
build_time() {
    local dir="$work/$1"
    local log="$work/$1.log"
    local start end
    start=$(date +%s.%N)
    if ! CARGO_TARGET_DIR="$dir/target" "$cargo" build --offline \
        --manifest-path "$dir/Cargo.toml" "${@:2}" >"$log" 2>&1; then
        echo "cargo build of $1 failed:" >&2
        cat "$log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }'
}

make_probe lean ', default-features = false'
make_probe full ''

echo "building a crate that depends on proxyless (fresh target dirs; $(nproc) cores)..." >&2
lean=$(build_time lean "$@")
echo "  default-features = false: ${lean} s" >&2
full=$(build_time full "$@")
echo "  default features:         ${full} s" >&2

printf 'default-features = false  %8s s  (%s crates)\n' "$lean" \
    "$(grep -c '^ *Compiling ' "$work/lean.log" || true)"
printf 'default features          %8s s  (%s crates)\n' "$full" \
    "$(grep -c '^ *Compiling ' "$work/full.log" || true)"
