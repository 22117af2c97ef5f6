#!/usr/bin/env bash
# Installs what lotcast needs on a Debian machine: redis-server, coturn and a virtualenv in .venv with the
# package. With --tests, also what the test suite needs: chromium, the dev extras and the offline
# Kubernetes manifest tools.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=0
if [ "${1:-}" = "--tests" ]; then TESTS=1; fi

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# a C compiler and the Python headers build the native fan-out extension (optional: without
# them the install falls back to the pure-Python path)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
# coturn: the TURN server `lotcast up --turn` runs (and the TURN tests)
command -v turnserver >/dev/null 2>&1 || need_apt+=(coturn)
if [ "$TESTS" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
  # tc (iproute2): the layer-choice tests shape one viewer's path on lo (tests/tc_support.py)
  command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || [ -x /sbin/tc ] || need_apt+=(iproute2)
  # GStreamer webrtcbin: the second WebRTC stack of the interop tests (tests/gst_support.py)
  for pkg in gstreamer1.0-plugins-bad gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly \
      gstreamer1.0-nice gstreamer1.0-tools python3-gi gir1.2-gst-plugins-bad-1.0 gir1.2-gstreamer-1.0; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
  done
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The redis-server package starts a system instance on :6379, and the coturn package may start
# one on :3478/:5349; lotcast runs its own of both.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
  $SUDO systemctl disable --now coturn >/dev/null 2>&1 || true
fi
# Without systemd running (containers) the package's init script may have started it instead.
if [ -x /etc/init.d/coturn ]; then
  $SUDO /etc/init.d/coturn stop >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$TESTS" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  # kubectl, kubernetes-validate and checkov for the offline manifest tests (tests/test_k8s*.py)
  bash scripts/setup_k8s_tools.sh
else
  .venv/bin/python -m pip install -q -e .
fi
echo "setup: done"
