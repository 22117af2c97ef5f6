#!/usr/bin/env bash
# Benchmark-only setup: what load/fanout_bench.py --janus needs beyond the test suite's setup.
# The test suite never needs Janus; scripts/setup.sh does not install it.
set -euo pipefail
if ! command -v janus >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "janus is missing; run as root (or: sudo apt-get install -y janus)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y janus
    # the package starts a system janus on its default ports; the bench runs its own
    systemctl disable --now janus >/dev/null 2>&1 || true
fi
janus --version | head -1
