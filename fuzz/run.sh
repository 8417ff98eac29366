#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: fuzz/run.sh [SECONDS_PER_TARGET] (default 30).
# Exits non-zero as soon as a target finds a crash (the input is left in fuzz/artifacts/).
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); RUSTC_BOOTSTRAP lets it use the
# nightly-only sanitizer flags on a stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
targets=(store_file store_live cookie record)

export RUSTC_BOOTSTRAP=1
cargo fuzz build
for target in "${targets[@]}"; do
    echo "== fuzz target $target: ${seconds}s"
    # The corpus grows in a scratch copy, so a run never leaves files among the seeds.
    work="$(mktemp -d)"
    cp corpus/"$target"/* "$work"/
    status=0
    cargo fuzz run "$target" "$work" -- -max_total_time="$seconds" -print_final_stats=1 || status=$?
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $target failed (exit $status); reproducer in fuzz/artifacts/$target/" >&2
        exit "$status"
    fi
done
echo "all fuzz targets ran ${seconds}s without a crash"
