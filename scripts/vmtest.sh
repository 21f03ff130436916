#!/usr/bin/env bash
# Runs the agent where it is meant to run: a pure cgroup v2 host, and systemd as PID 1, in a
# virtual machine (virtme-ng + qemu, TCG), from this clone (needs root, scripts/setup.sh done).
#
#   bash scripts/vmtest.sh            # set up (cached), then both lanes
#   bash scripts/vmtest.sh v2         # only the cgroup v2 lane (tests/vm/test_v2_host.py)
#   bash scripts/vmtest.sh systemd    # only the systemd lane (tests/vm/test_systemd_host.py)
#   bash scripts/vmtest.sh setup      # only the set-up
#
# Set-up (idempotent, everything cached under .vmtest/ of the clone, gitignored): apt packages
# qemu-system-x86 busybox-static kmod; Debian's generic kernel (the version linux-image-amd64
# depends on; the -cloud flavour has no 9p) unpacked with dpkg -x and its modules indexed
# there (depmod -b); virtme-ng in its own venv .vmtest/venv; scripts/install.sh run with
# --root .vmtest/instroot --prefix .vmtest/sysvenv for the systemd lane.
# The host's own kernel and boot are not touched.
#
# The guest sees this host's root read-only over 9p; .vmtest/out/<lane> is shared writable and
# receives the lane's pytest output.  Each lane prints pytest's summary line ("N passed, M
# failed") and the script exits non-zero when any lane fails.  qemu runs under `nice -n 10`,
# one VM at a time, with a hard time limit (VMTEST_TIMEOUT seconds per lane, default 1200).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=$ROOT/.vmtest
export DEBIAN_FRONTEND=noninteractive

setup() {
  local missing="" p
  for p in qemu-system-x86 busybox-static kmod; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/kernel-version" ]; then
    apt-get update -qq
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
    [ -n "$pkg" ] || { echo "vmtest: cannot resolve the kernel package from linux-image-amd64" >&2; exit 1; }
    rm -rf "$CACHE/kernel" "$CACHE/deb" && mkdir -p "$CACHE/kernel" "$CACHE/deb"
    (cd "$CACHE/deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
    dpkg -x "$CACHE"/deb/*.deb "$CACHE/kernel"
    rm -rf "$CACHE/deb"
    ls "$CACHE/kernel/lib/modules" | head -n1 > "$CACHE/kernel-version"
  fi
  KVER=$(cat "$CACHE/kernel-version")
  KERNEL=$CACHE/kernel/boot/vmlinuz-$KVER
  # the guest loads modules from the unpacked tree (vng links it into /lib/modules there)
  [ -e "$CACHE/kernel/lib/modules/$KVER/modules.dep" ] || depmod -b "$CACHE/kernel" "$KVER"
  # vng --systemd mounts a tmpfs on the guest's /lib/modules (the host root, read-only there)
  # to link the tree in: the directory must exist on the host, empty is enough
  mkdir -p /lib/modules
  if [ ! -x "$CACHE/venv/bin/vng" ]; then
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q virtme-ng
  fi
  # the systemd lane's agent, installed by scripts/install.sh (docs/operations.md) in its
  # packaging mode here on the host, as the guest has no network for pip: the venv
  # .vmtest/sysvenv with the distribution's python3, as on a production host (the unit's
  # ProtectHome= hides /root, where the interpreter of the clone's .venv may live), the
  # unit and snippets under .vmtest/instroot; redone when the sources change
  local stamp
  stamp=$( (git rev-parse HEAD; git diff HEAD -- agent native seccomp systemd scripts/install.sh \
              setup.py pyproject.toml; git status --porcelain -- agent native seccomp systemd) \
           2>/dev/null | sha256sum)
  if [ "$(cat "$CACHE/install.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$CACHE/sysvenv" "$CACHE/instroot"
    PYTHON=/usr/bin/python3 bash scripts/install.sh --no-apt --prefix "$CACHE/sysvenv" \
      --root "$CACHE/instroot" >"$CACHE/install.log" 2>&1 \
      || { tail -n 30 "$CACHE/install.log" >&2; exit 1; }
    echo "$stamp" > "$CACHE/install.stamp"
  fi
}

setup
[ "${1:-all}" = setup ] && exit 0

# run_lane NAME GUEST_CMD [vng options…]: boots one VM, waits for it, prints the lane's log and
# returns the lane's exit status (from NAME.rc, written by the guest; missing = failure).
run_lane() {
  local lane=$1 cmd=$2; shift 2
  local out=$CACHE/out
  mkdir -p "$out" && rm -f "$out/$lane.log" "$out/$lane.rc"
  local t0=$SECONDS
  echo "vmtest: $lane lane: booting $KVER under TCG (nice 10)…"
  # setsid: qemu and vng in their own process group, so a timeout kills exactly them
  setsid nice -n 10 "$CACHE/venv/bin/vng" --run "$KERNEL" --disable-kvm --memory 3G --cpus 2 \
    --rwdir "$out" "$@" ${cmd:+-- "$cmd"} </dev/null >"$out/$lane.console" 2>&1 &
  local vm=$! limit=${VMTEST_TIMEOUT:-1200}
  while kill -0 "$vm" 2>/dev/null; do
    if (( SECONDS - t0 > limit )); then
      echo "vmtest: $lane lane: over ${limit}s, killing the VM" >&2
      kill -KILL -- "-$vm" 2>/dev/null || true
      break
    fi
    sleep 2
  done
  wait "$vm" 2>/dev/null || true
  [ -f "$out/$lane.log" ] && cat "$out/$lane.log"
  local rc
  rc=$(cat "$out/$lane.rc" 2>/dev/null || echo missing)
  echo "vmtest: $lane lane: exit ${rc}, $((SECONDS - t0)) s wall"
  if [ "$rc" = missing ]; then
    echo "vmtest: $lane lane: the guest wrote no result; console:" >&2
    tail -n 40 "$out/$lane.console" >&2 || true
    echo "$lane: 0 passed, 1 failed"
    return 1
  fi
  return "$rc"
}

export PATH=$CACHE/venv/bin:$PATH
lane=${1:-all}
case $lane in all|v2|systemd) ;; *) echo "usage: $0 [all|v2|systemd|setup]" >&2; exit 2 ;; esac
status=0
if [ "$lane" != systemd ]; then
  run_lane v2 "bash scripts/vm/guest-v2.sh $CACHE/out" || status=1
fi
if [ "$lane" != v2 ]; then
  # systemd as PID 1 (vng --systemd boots `init=/bin/sh -c '… SYSTEMD_UNIT_PATH=…: exec
  # /sbin/init'`).  vng reads the guest's fstab path from its config (our HOME).  The kernel
  # hands parameters without a dot to init as environment: SYSTEMD_GENERATOR_PATH adds our
  # generator, which adds the unit running the test driver (booted into with systemd.unit=:
  # the basic system without the host's multi-user services; the VM powers off after it), and
  # `container=` (empty) tells PID 1 it is not in a container (the shared root has a
  # /.dockerenv, and in a container systemd ignores the kernel command line).
  mkdir -p "$CACHE/home/.config/virtme-ng"
  fstab=$ROOT/scripts/vm/fstab
  share=()
  case $ROOT/ in
    /tmp/*|/var/tmp/*|/var/lib/*)
      # a checkout (a CI clone) below a directory the guest mounts a tmpfs on (PrivateTmp=,
      # SQLite WAL, the host's /tmp crawled by systemd-tmpfiles): the clone is shared once
      # more, read-only, at /srv (a virtio 9p tag mounts once), and bound back over its own
      # path after that tmpfs (its absolute paths keep working); the unit's PrivateTmp= /tmp
      # gets it from /srv (tests/vm/test_systemd_host.py adds BindReadOnlyPaths=/srv:<clone>)
      fstab=$CACHE/fstab
      { cat "$ROOT/scripts/vm/fstab"
        echo "virtme.initmount1 /srv 9p trans=virtio,version=9p2000.L,ro 0 0"
        echo "/srv $ROOT none bind,ro 0 0"
      } > "$fstab"
      share=(--rodir "/srv=$ROOT") ;;
  esac
  printf '{"default_opts": {}, "clean_exclude": [], "systemd": {"masks": ["getty@"], "fstab": "%s"}}\n' \
    "$fstab" > "$CACHE/home/.config/virtme-ng/virtme-ng.conf"
  HOME=$CACHE/home run_lane systemd "" --systemd "${share[@]}" --append container= --append panic=-1 \
    --append "SYSTEMD_GENERATOR_PATH=$ROOT/scripts/vm/generators:" \
    --append systemd.unit=nrx-vmtest.service \
    ${VMTEST_SYSTEMD_DEBUG:+--append systemd.log_target=console --append systemd.show_status=1} \
    || status=1
fi
exit $status
