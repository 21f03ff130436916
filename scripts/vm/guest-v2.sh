#!/bin/bash
# Inside the v2 guest (PID 1 is virtme-ng-init, cgroup2 on /sys/fs/cgroup): run the cgroup v2
# lane's tests.  $1 = the shared output directory; writes v2.log and v2.rc there.
set -u
out=$1
exec >"$out/v2.log" 2>&1
# a private temp dir on a guest tmpfs (the default /tmp is an overlay over the host's); not
# mounted over /tmp, which may hold this very checkout (a CI clone in /tmp/…)
tmp=/run/nrx-vmtmp
mkdir -p "$tmp" && mount -t tmpfs -o mode=1777,size=1G tmpfs "$tmp"
export TMPDIR=$tmp PYTHONDONTWRITEBYTECODE=1 NRX_VM_LANE=v2
echo "guest: $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
.venv/bin/python -m pytest -p no:cacheprovider -q -o addopts="-ra --strict-markers" \
  tests/vm/test_v2_host.py ${VMTEST_PYTEST_ARGS:-}
echo $? > "$out/v2.rc"
