#!/bin/bash
# Inside the systemd guest: started by systemd (PID 1) as kernel-command-line.service
# (systemd.run= on the kernel command line; the VM powers off when it exits).  Mounts the
# shared output directory, makes /etc writable (an overlay on a tmpfs: the unit is installed
# there), runs the systemd lane's tests.  Writes systemd.log and systemd.rc to the output dir.
set -u
cd "$(dirname "$0")/../.."
out=$(pwd)/.vmtest/out
mount -t 9p -o trans=virtio,version=9p2000.L,rw virtme.initmount0 "$out"
exec >"$out/systemd.log" 2>&1
mkdir -p /run/vmtest-etc && mount -t tmpfs tmpfs /run/vmtest-etc
mkdir -p /run/vmtest-etc/upper /run/vmtest-etc/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/vmtest-etc/upper,workdir=/run/vmtest-etc/work /etc
export TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 NRX_VM_LANE=systemd
echo "guest: $(uname -r), PID 1: $(cat /proc/1/comm), virt: $(systemd-detect-virt), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
.venv/bin/python -m pytest -p no:cacheprovider -q -o addopts="-ra --strict-markers" \
  tests/vm/test_systemd_host.py ${VMTEST_PYTEST_ARGS:-}
rc=$?
journalctl -u nanorix-agent -o short-monotonic --no-pager > "$out/systemd-journal.txt" 2>&1
echo $rc > "$out/systemd.rc"
