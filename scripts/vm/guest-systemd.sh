#!/bin/bash
# Inside the systemd guest: started by systemd (PID 1) as nrx-vmtest.service, which
# scripts/vm/generators adds and systemd.unit= boots into (the VM powers off after it).  Mounts the
# shared output directory, makes /etc, /usr, /opt writable (overlays on a tmpfs: the unit is
# installed there), runs the systemd lane's tests.  Writes systemd.log and systemd.rc to the output dir.
set -u
cd "$(dirname "$0")/../.."
out=$(pwd)/.vmtest/out
mount -t 9p -o trans=virtio,version=9p2000.L,rw virtme.initmount0 "$out"
exec >"$out/systemd.log" 2>&1
# the host root is read-only here: the install writes /etc (unit, snippets, users), /usr
# (docs, completion, link); changes go to a tmpfs and vanish with the VM
mkdir -p /run/vmtest-ov && mount -t tmpfs tmpfs /run/vmtest-ov
for d in etc usr opt; do
  mkdir -p /run/vmtest-ov/$d/upper /run/vmtest-ov/$d/work
  mount -t overlay overlay \
    -o lowerdir=/$d,upperdir=/run/vmtest-ov/$d/upper,workdir=/run/vmtest-ov/$d/work /$d
done
export TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 NRX_VM_LANE=systemd NRX_VM_OUT=$out
echo "guest: $(uname -r), PID 1: $(cat /proc/1/comm), virt: $(systemd-detect-virt), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
.venv/bin/python -m pytest -p no:cacheprovider -q -o addopts="-ra --strict-markers" \
  tests/vm/test_systemd_host.py ${VMTEST_PYTEST_ARGS:-}
rc=$?
journalctl -u nanorix-agent -o short-monotonic --no-pager > "$out/systemd-journal.txt" 2>&1
echo $rc > "$out/systemd.rc"
