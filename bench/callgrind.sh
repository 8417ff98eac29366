#!/usr/bin/env bash
# Instructions (valgrind's callgrind) per store operation and per layer request, for the
# checkout at $1 (default: this one). Instruction counts do not move with the machine's load,
# so two checkouts can be compared on a busy machine: run it on each and compare the lines.
#
#     bench/callgrind.sh [checkout]
set -euo pipefail
tree=$(cd "${1:-$(dirname "$0")/..}" && pwd)
cd "$tree"
store_bin=$tree/$(cargo bench -p mmap-session-store --bench store --no-run 2>&1 \
    | grep -o 'target/release/deps/store-[0-9a-f]*' | tail -1)
layer_bin=$tree/$(cargo bench -p mmap-session --bench layer --no-run 2>&1 \
    | grep -o 'target/release/deps/layer-[0-9a-f]*' | tail -1)
collected() { grep -o 'Collected : [0-9]*' "$1" | grep -o '[0-9]*$'; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for mode in loop-rmw loop-get; do
    for size in 128 1024 16384; do
        # The difference between 22,000 and 2,000 operations: set-up cancels out.
        for ops in 2000 22000; do
            rm -f "$work/sessions.mmap"
            MMAP_BENCH_CHILD=$mode MMAP_BENCH_PATH=$work MMAP_BENCH_OPS=$ops MMAP_BENCH_SIZE=$size \
                valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$store_bin" \
                >/dev/null 2>"$work/err.$ops"
        done
        echo "store $mode $size B: $(( ($(collected "$work/err.22000") - $(collected "$work/err.2000")) / 20000 )) instructions per operation"
    done
done
for case in counter peek new counter_16k untouched; do
    (cd "$work" && MMAP_LAYER_BENCH_LOOP=$case MMAP_LAYER_BENCH_OPS=2000 \
        valgrind --tool=callgrind --toggle-collect='*Bench*once*' --callgrind-out-file="$work/cg" \
        "$layer_bin" >/dev/null 2>"$work/err")
    echo "layer $case: $(( $(collected "$work/err") / 2000 )) instructions per request"
done
