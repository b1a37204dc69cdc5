#!/usr/bin/env bash
# Installs what the integration tests and the end-to-end benchmark need, when it is missing (as
# root, with apt-get): wireguard-go and tools, iproute2 (namespaces), nftables (the roaming
# test's NAT), curl, dnsmasq, ping, python3 with PyNaCl, prometheus_client and
# PyYAML, aioice, iperf3, groff (renders the man page), coturn (a TURN server), openssh-server
# (`nc` as ssh's ProxyCommand).
set -euo pipefail

need=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools ip:iproute2 curl:curl \
            dnsmasq:dnsmasq-base ping:iputils-ping python3:python3 iperf3:iperf3 groff:groff-base \
            nft:nftables turnserver:coturn sshd:openssh-server; do
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
# PyNaCl: the independent NaCl implementation the envelope test checks compatibility against.
if ! python3 -c 'import nacl' >/dev/null 2>&1; then
    echo "== installing PyNaCl"
    python3 -m pip install --quiet pynacl
fi
# prometheus_client: the reference parser the status test checks /metrics with.
if ! python3 -c 'import prometheus_client' >/dev/null 2>&1; then
    echo "== installing prometheus_client"
    python3 -m pip install --quiet prometheus_client
fi
# aioice: the independent ICE agent tests/ice_interop.rs checks our agent against.
if ! python3 -c 'import aioice' >/dev/null 2>&1; then
    echo "== installing aioice"
    python3 -m pip install --quiet aioice
fi
# PyYAML: reads docker/compose.yaml for the test that runs it without Docker.
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    echo "== installing PyYAML"
    python3 -m pip install --quiet pyyaml
fi
