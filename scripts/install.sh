#!/usr/bin/env bash
# Install nanorix-agent on Debian 12 (as root): a virtualenv with the agent and its native
# parts, the systemd unit, sysusers/tmpfiles snippets, docs, shell completion and a
# /usr/local/bin/nanorix-agent link.  Non-interactive and idempotent: running it again
# upgrades the venv in place and rewrites the same files.  docs/operations.md explains each step.
#
#   scripts/install.sh [--prefix DIR] [--root DIR] [--no-apt] [--host-network] [--enable]
#
#   --prefix DIR     the virtualenv (default /opt/nanorix-agent); the unit's ExecStart= points here
#   --root DIR       write unit, snippets, docs, completion and link below DIR instead of /
#                    (packaging, tests); nothing is applied to the running system then
#   --no-apt         do not apt-get install the build and runtime packages
#   --host-network   also install the drop-in that gives the unit the host network (needed
#                    for any TCP listener, e.g. [metrics] listen); see docs/operations.md
#   --enable         systemctl enable --now the unit (only without --root, under systemd)
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/nanorix-agent
ROOT=
APT=1
HOST_NETWORK=0
ENABLE=0
usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --no-apt) APT=0; shift ;;
    --host-network) HOST_NETWORK=1; shift ;;
    --enable) ENABLE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: needs root (apt, /etc, and the agent itself runs as root)" >&2; exit 2
fi
ROOT=${ROOT%/}
DOCDIR=/usr/share/doc/nanorix-agent
UNIT=/etc/systemd/system/nanorix-agent.service
say() { echo "install.sh: $*"; }

# 1. packages: compiler and headers for the native parts, python venv, util-linux tools
if [ "$APT" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  PKGS="build-essential pkg-config libseccomp-dev libsodium-dev libcap-dev python3-venv python3-dev util-linux"
  missing=""
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    say "apt-get install$missing"
    apt-get update -qq
    apt-get install -y -qq $missing >/dev/null
  fi
fi

# 2. the virtualenv (reused when it exists) with the agent built from this checkout
PY=${PYTHON:-python3}
[ -x "$PREFIX/bin/python" ] || "$PY" -m venv "$PREFIX"
PIP=("$PREFIX/bin/pip" -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip setuptools wheel cffi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"${PIP[@]}" wheel --no-deps --no-build-isolation -w "$wheels" "$SRC"   # build once
"${PIP[@]}" install --force-reinstall --no-deps "$wheels"/nanorix_agent-*.whl  # same version too
"${PIP[@]}" install "$wheels"/nanorix_agent-*.whl                       # its dependencies
VERSION=$("$PREFIX/bin/nanorix-agent" --version)
say "$VERSION in $PREFIX"

# 3. systemd unit (ExecStart= pointing into the venv), snippets, docs, completion, link
tmp="$wheels/tmp"
sed -e "s#^ExecStart=/opt/nanorix-agent/bin/nanorix-agent #ExecStart=$PREFIX/bin/nanorix-agent #" \
    -e "s#file:///usr/share/doc/nanorix-agent/#file://$DOCDIR/#" \
    "$SRC/systemd/nanorix-agent.service" > "$tmp"
install -D -m 0644 "$tmp" "$ROOT$UNIT"
install -D -m 0644 "$SRC/systemd/sysusers.d/nanorix-agent.conf" "$ROOT/etc/sysusers.d/nanorix-agent.conf"
install -D -m 0644 "$SRC/systemd/tmpfiles.d/nanorix-agent.conf" "$ROOT/etc/tmpfiles.d/nanorix-agent.conf"
install -d -m 0755 "$ROOT/etc/nanorix-agent"
for f in docs/operations.md docs/design.md README.md systemd/host-network.conf; do
  install -D -m 0644 "$SRC/$f" "$ROOT$DOCDIR/$(basename "$f")"
done
if [ "$HOST_NETWORK" = 1 ]; then
  install -D -m 0644 "$SRC/systemd/host-network.conf" \
    "$ROOT/etc/systemd/system/nanorix-agent.service.d/host-network.conf"
fi
"$PREFIX/bin/nanorix-agent" completion bash > "$tmp"
install -D -m 0644 "$tmp" "$ROOT/usr/share/bash-completion/completions/nanorix-agent"
install -d -m 0755 "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/bin/nanorix-agent" "$ROOT/usr/local/bin/nanorix-agent"
say "unit $ROOT$UNIT, docs $ROOT$DOCDIR"

# 4. apply to this system (not with --root)
if [ -z "$ROOT" ]; then
  command -v systemd-sysusers >/dev/null && systemd-sysusers /etc/sysusers.d/nanorix-agent.conf
  command -v systemd-tmpfiles >/dev/null && systemd-tmpfiles --create /etc/tmpfiles.d/nanorix-agent.conf
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if systemctl is-active --quiet nanorix-agent.service; then
      say "the running agent keeps the old version until: systemctl restart nanorix-agent"
    fi
    if [ "$ENABLE" = 1 ]; then
      systemctl enable --now nanorix-agent.service
      say "enabled and started nanorix-agent.service"
    else
      say "next: nanorix-agent doctor; systemctl enable --now nanorix-agent"
    fi
  else
    say "systemd is not running here: start the agent with $PREFIX/bin/nanorix-agent serve"
  fi
fi
