#!/usr/bin/env bash
# Run: examples/demo.sh            (then open the URL it prints; Ctrl-C stops everything)
#
# Builds the `shop` example and starts three copies of it side by side, sharing one session file in
# a temporary directory. With nginx installed they sit behind it (round robin, config rendered from
# examples/nginx/nginx.conf.template, nginx run as you with a private prefix in the temporary
# directory); without nginx they all listen on one port with SO_REUSEPORT and the kernel spreads the
# connections. Every page shows the pid of the process that served it.
#
# Environment: PORT (default 8080) is the port to open; the copies behind nginx use PORT+1..PORT+3.
# RUST_LOG is passed to the shop processes (default info). Logs and the session file go to the
# temporary directory, which Ctrl-C removes unless KEEP_DEMO_DIR=1 (it is kept after a failure).
set -euo pipefail

cd "$(dirname "$0")/.."
PORT="${PORT:-8080}"
COPIES=3

echo "Building the shop example (release)..."
cargo build --release --example shop
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
shop="${target_dir:-target}/release/examples/shop"

work="$(mktemp -d -t mmap-session-demo.XXXXXX)"
pids=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    echo
    echo "Stopping..."
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" = 130 ] && [ -z "${KEEP_DEMO_DIR:-}" ]; then
        rm -rf "$work"
        echo "Stopped."
    else
        echo "Stopped. Logs and the session file are in $work."
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls http://127.0.0.1:$1/health until it answers, for 30 seconds at most.
wait_healthy() {
    local port="$1" deadline=$((SECONDS + 30))
    until curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "Nothing answers on port $port; see the logs in $work" >&2
            exit 1
        fi
        for pid in "${pids[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "A process exited early; see the logs in $work" >&2
                exit 1
            fi
        done
        sleep 0.1
    done
}

start_shop() {
    local index="$1" listen="$2"
    shift 2
    RUST_LOG="${RUST_LOG:-info}" "$shop" --listen "$listen" --store "$work/sessions" \
        --insecure-cookies "$@" >"$work/shop-$index.log" 2>&1 &
    pids+=("$!")
}

if command -v nginx >/dev/null 2>&1; then
    servers=""
    for i in $(seq 1 "$COPIES"); do
        port=$((PORT + i))
        start_shop "$i" "127.0.0.1:$port"
        servers+="        server 127.0.0.1:$port max_fails=0;"$'\n'
    done
    for i in $(seq 1 "$COPIES"); do
        wait_healthy $((PORT + i))
    done
    prefix="$work/nginx"
    mkdir -p "$prefix"
    user_line=""
    if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
    template="$(cat examples/nginx/nginx.conf.template)"
    template="${template//@USER@/$user_line}"
    template="${template//@PREFIX@/$prefix}"
    template="${template//@LISTEN@/127.0.0.1:$PORT}"
    template="${template//@SERVERS@/$servers}"
    printf '%s\n' "$template" >"$prefix/nginx.conf"
    nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log" &
    pids+=("$!")
    wait_healthy "$PORT"
    how="behind nginx (round robin over ports $((PORT + 1))-$((PORT + COPIES)))"
else
    for i in $(seq 1 "$COPIES"); do
        start_shop "$i" "127.0.0.1:$PORT" --reuse-port
    done
    wait_healthy "$PORT"
    how="on one port with SO_REUSEPORT (nginx is not installed)"
fi

echo
echo "Three shop processes (pids ${pids[*]:0:$COPIES}) share $work/sessions, $how."
echo
echo "    Open http://127.0.0.1:$PORT/"
echo
echo "Sign in, fill the cart, reload: the pid at the bottom of each page changes, the cart does not."
echo "Press Ctrl-C to stop."
wait
