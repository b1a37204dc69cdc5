#!/usr/bin/env bash
# Runs every check and test of netbird-proxy on a fresh machine: installs what the tests need
# when it is missing (as root, with apt-get), then formatting, lints, unit and integration tests.
# The integration tests make network namespaces and run wireguard-go, so they need root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/deps.sh
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add clippy rustfmt
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo clippy -D warnings, the library as users build it (no internals)"
cargo clippy --lib --bins --locked -- -D warnings
echo "== cargo doc: the public API documented, every intra-doc link resolving"
RUSTDOCFLAGS="-D warnings -D rustdoc::broken_intra_doc_links" cargo doc --no-deps --lib --locked
echo "== the public API is the one listed in public-api.txt"
# rustdoc's JSON is unstable: RUSTC_BOOTSTRAP lets the stable toolchain write it, into its own
# target directory so the main build is not invalidated.
RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="-Z unstable-options --output-format json" \
    cargo doc --quiet --no-deps --lib --locked --target-dir target/api
python3 tests/public_api.py target/api/doc/netbird_proxy.json > target/api/public-api.txt
if ! diff -u public-api.txt target/api/public-api.txt; then
    echo "the public API changed: if that is meant, copy target/api/public-api.txt over public-api.txt"
    exit 1
fi
echo "== cargo build --release (the binary tests/container.rs puts in the images)"
cargo build --release --locked --bin netbird-proxy
export NB_RELEASE_BIN="$PWD/target/release/netbird-proxy"
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
