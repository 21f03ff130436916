#!/usr/bin/env bash
# Installs what the agent needs on Debian (as root) and builds it into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# systemd: systemd-analyze verify/security for the unit tests (nothing is started)
PKGS="build-essential pkg-config libseccomp-dev libsodium-dev libcap-dev python3-venv python3-dev bubblewrap systemd"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel cffi
.venv/bin/pip install -q --no-build-isolation -e '.[test]'
