#!/usr/bin/env bash
# Builds every fuzz target once (one crate, one target directory: fuzz/target)
# and runs each for FUZZ_SECONDS seconds (default 25; 12 targets take under
# 5 minutes together), starting from its committed seeds (fuzz/seeds/TARGET)
# plus what earlier runs on this machine found (fuzz/target/corpus/TARGET,
# not committed). Fails if any target crashes, leaks past the RSS limit or
# takes longer than the per-input timeout, printing the reproducer's path and
# the command that replays it. `.ci/run` calls this; run it by hand the same
# way (FUZZ_SECONDS=60 fuzz/ci.sh for the numbers in BENCHMARKS.md).
#
# Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its flags; no
# sanitizer (`-s none`): the workspace forbids unsafe code, so what a fuzzer
# finds here is a panic, an abort, a timeout or runaway memory, which
# libFuzzer catches without one. 16 codegen units build several times faster
# than cargo-fuzz's default of 1 and cost a little speed per execution.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
CARGO_FUZZ_VERSION=0.13.1
SECONDS_EACH=${FUZZ_SECONDS:-25}
FLAGS=(-s none --codegen-units 16)

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

start=$(date +%s)
cargo fuzz build "${FLAGS[@]}"
echo "fuzz build: $(($(date +%s) - start)) s"

failed=()
for target in $(cargo fuzz list | grep -vx seeds); do
    corpus=target/corpus/$target
    artifacts=artifacts/$target
    mkdir -p "$corpus" "$artifacts" "seeds/$target"
    log=target/fuzz-$target.log
    # The binary the build made, run directly: `cargo fuzz run` would
    # rebuild first whenever a source changed since.
    if "target/x86_64-unknown-linux-gnu/release/$target" "$corpus" "seeds/$target" \
        -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
        echo "fuzz $target: ${SECONDS_EACH} s, ${execs:-?} executions (${rate:-?}/s), $cov, no crash"
    else
        echo "fuzz $target: FAILED; the end of its log ($log):"
        tail -n 40 "$log"
        for f in "$artifacts"/*; do
            [ -e "$f" ] || continue
            echo "reproducer: fuzz/$f"
            echo "replay with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${FLAGS[*]} $target $f"
        done
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: every target ran ${SECONDS_EACH} s with no crash ($(($(date +%s) - start)) s in all)"
