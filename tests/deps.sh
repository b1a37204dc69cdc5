#!/usr/bin/env bash
# Installs what the integration tests and the end-to-end benchmark need, when it is missing (as
# root, with apt-get): wireguard-go and tools, iproute2 (namespaces), nftables (the roaming
# test's NAT), curl, dnsmasq, ping, python3 with PyNaCl, prometheus_client and
# PyYAML, aioice, iperf3, groff (renders the man page), coturn (a TURN server), openssh-server
# (`nc` as ssh's ProxyCommand), dig (bind9-dnsutils) and PySocks (UDP through SOCKS5).
set -euo pipefail

need=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools ip:iproute2 curl:curl \
            dnsmasq:dnsmasq-base ping:iputils-ping python3:python3 iperf3:iperf3 groff:groff-base \
            nft:nftables turnserver:coturn sshd:openssh-server dig:bind9-dnsutils; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    echo "== installing: ${need[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "tests/deps.sh: missing ${need[*]} and not root; install them or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Python packages, module:package. PyNaCl: the independent NaCl implementation the envelope
# test checks against; prometheus_client: the reference parser for /metrics; aioice: the
# independent ICE agent of tests/ice_interop.rs; PySocks: an independent SOCKS5 UDP client;
# websockets: a WebSocket server for the HTTP proxy's upgrade test; PyYAML: reads
# docker/compose.yaml for the test that runs it without Docker.
for pair in nacl:pynacl prometheus_client:prometheus_client aioice:aioice socks:pysocks \
            websockets:websockets yaml:pyyaml; do
    if ! python3 -c "import ${pair%%:*}" >/dev/null 2>&1; then
        echo "== installing ${pair#*:}"
        python3 -m pip install --quiet "${pair#*:}"
    fi
done
