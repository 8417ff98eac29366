#!/usr/bin/env bash
# The whole test suite in one command, set-up included:
#
#     tests/run.sh [--dry-run] [-- ARGS FOR cargo test]
#
# Checks for what the tests need besides Rust: nginx (end-to-end tests), redis-server (the Redis
# backend's tests), chromium and chromium-driver (the browser test), strace (the store's
# durability tests), a C compiler, CA certificates, and root or password-less sudo (one test
# gives a file to another user). What is missing is installed with apt-get, as root or through
# sudo, after saying what; then it runs `cargo test --workspace`. It stops with a message and a
# non-zero exit where it cannot (no apt-get, no root and no sudo, an install that failed).
#
# --dry-run: say what is missing and what would be run, change nothing, run nothing (exit 0 if
# the suite could run, 1 if something is missing).
#
# The programs are looked for where the tests look for them; $NGINX, $REDIS_SERVER, $CHROMIUM,
# $CHROMEDRIVER and $STRACE point the tests (and this check) at other copies.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
cargo_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --) shift; cargo_args=("$@"); break ;;
        -h|--help) sed -n '2,18s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "tests/run.sh: unknown argument '$1' (see tests/run.sh --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "tests/run.sh: $*"; }
fail() { echo "tests/run.sh: $*" >&2; exit 1; }

# A program in PATH or in the system directories the tests also search.
find_program() {
    local name="$1" dir
    if command -v "$name" >/dev/null 2>&1; then return 0; fi
    for dir in /usr/sbin /sbin; do
        if [ -x "$dir/$name" ]; then return 0; fi
    done
    return 1
}

# An explicit path if one is set, else the program's usual place.
have() {
    local override="$1" fallback="$2"
    if [ -n "$override" ]; then
        [ -x "$override" ]
    elif [[ "$fallback" == /* ]]; then
        [ -x "$fallback" ]
    else
        find_program "$fallback"
    fi
}

# "what is needed" "Debian package": filled with what is missing.
missing=()
missing_packages=()
check() {
    local what="$1" package="$2" override="$3" fallback="$4"
    if ! have "$override" "$fallback"; then
        missing+=("$what")
        missing_packages+=("$package")
    fi
}

check_all() {
    missing=()
    missing_packages=()
    check "nginx (end-to-end tests)" nginx "${NGINX:-}" nginx
    check "redis-server (Redis backend tests)" redis-server "${REDIS_SERVER:-}" redis-server
    check "chromium (browser test)" chromium "${CHROMIUM:-}" /usr/bin/chromium
    check "chromedriver (browser test)" chromium-driver "${CHROMEDRIVER:-}" /usr/bin/chromedriver
    check "strace (store durability tests)" strace "${STRACE:-}" strace
    check "a C compiler (cc, for building)" gcc "" cc
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then
        missing+=("CA certificates (fetching crates)")
        missing_packages+=(ca-certificates)
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    fail "cargo was not found in PATH: install Rust first (https://rustup.rs), then run this again"
fi

# Root, or sudo: to install, and for the test that gives a store file to another user.
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
    privileged=1
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
    privileged=1
else
    sudo=()
    privileged=0
fi

# Why nothing can be installed here, if so.
cannot_install=""
if ! command -v apt-get >/dev/null 2>&1; then
    cannot_install="there is no apt-get on this machine"
elif [ "$privileged" -eq 0 ]; then
    cannot_install="installing needs root or password-less sudo"
fi

check_all
if [ ${#missing[@]} -gt 0 ]; then
    say "missing: ${missing[*]}"
    if [ -n "$cannot_install" ]; then
        fail "$cannot_install: install these yourself (Debian: apt-get install ${missing_packages[*]}), then run this again"
    fi
    install=(apt-get install -y --no-install-recommends "${missing_packages[@]}")
    if [ "$dry_run" -eq 1 ]; then
        say "would run: ${sudo[*]} apt-get update; ${sudo[*]} ${install[*]}"
        say "would then run: cargo test --workspace ${cargo_args[*]}"
        exit 1
    fi
    wanted=("${missing_packages[@]}")
    say "installing with apt-get: ${wanted[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq || fail "apt-get update failed"
    "${sudo[@]}" "${install[@]}" || fail "apt-get could not install ${wanted[*]}"
    check_all
    if [ ${#missing[@]} -gt 0 ]; then
        fail "still missing after the install: ${missing[*]}"
    fi
    say "installed: ${wanted[*]}"
fi

if [ "$privileged" -eq 0 ]; then
    fail "the suite needs root or password-less sudo (a security test gives a store file to another user with chown); run it as root or configure sudo"
fi

if [ "$dry_run" -eq 1 ]; then
    say "everything the tests need is here"
    say "would run: cargo test --workspace ${cargo_args[*]}"
    exit 0
fi

say "running: cargo test --workspace ${cargo_args[*]}"
exec cargo test --workspace "${cargo_args[@]}"
