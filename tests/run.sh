#!/usr/bin/env bash
# Runs every check and test of netbird-proxy on a fresh machine: installs what the tests need
# when it is missing (as root, with apt-get), then formatting, lints, unit and integration tests.
# The integration tests make network namespaces and run wireguard-go, so they need root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools ip:iproute2 curl:curl \
            dnsmasq:dnsmasq-base ping:iputils-ping python3:python3 iperf3:iperf3; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    echo "== installing: ${need[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: missing ${need[*]} and not root; install them or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# PyNaCl: the independent NaCl implementation the envelope test checks compatibility against.
if ! python3 -c 'import nacl' >/dev/null 2>&1; then
    echo "== installing PyNaCl"
    python3 -m pip install --quiet pynacl
fi
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add clippy rustfmt
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# Bounded: a hung test fails the run instead of eating CI's time.
timeout --kill-after=30 2400 cargo test --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-4}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
