"""The bench's peers and floor: crun, runc and a C program doing a lifecycle's kernel work.

Used by bench/run.py; every peer here is optional and skipped (with the reason printed)
when its program is missing:

* `OciRuntimes`: crun and runc (`apt-get install crun runc`) on a minimal OCI bundle
  like the agent's sandbox (read-only root with the host /usr bound read-only, /proc,
  /dev, a /tmp tmpfs, user/mnt/pid/net/ipc/uts/cgroup namespaces, the memory, pids and
  cpu limits of the bench tier, uid 0 mapped to a host range of this run).  Both run
  from one worker process in a private mount namespace where the controller-less
  cgroup2 mount of this hybrid host (/sys/fs/cgroup/unified) is replaced by an empty
  tmpfs: crun refuses hybrid mode ("cgroups in hybrid mode not supported") and would
  otherwise write its cgroup.procs into the tmpfs under the host's cgroup2 mount.  The
  worker times each operation itself (the subprocess calls only), so talking to it
  costs the peer nothing.
* `Floor`: bench/floor/floor.c, built here with `cc -O2 … -lsodium` (build-essential and
  libsodium-dev come with scripts/setup.sh).
* `RunIdentity`: a random host uid range and cgroup prefix per bench run, the range
  claimed with an flock so two benches on one host cannot pick the same one.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLOT = 65536  # host uids per sandbox / container / floor process


# ----------------------------------------------------------------------------- identity

class RunIdentity:
    """This run's host uid range and cgroup prefix.

    The uid space above 2^31 is cut into blocks of `span` uids; a run takes a random free
    block and holds an exclusive flock on `/run/lock/nrx-bench-uids-<block>` for its
    whole life, so a second bench on the host takes another block.  The cgroup prefix
    carries a random tag; the agent gets `prefix`, the peers `prefix-oci`, the floor
    `prefix-floor-N`, so one `prefix*` glob finds everything the run made.
    """

    FIRST = 1 << 31

    def __init__(self, span: int) -> None:
        self.span = span
        blocks = (2**32 - 2 - self.FIRST) // span
        lockdir = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
        order = random.sample(range(blocks), blocks)
        for b in order:
            fd = os.open(lockdir / f"nrx-bench-uids-{b}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock = fd
            self.uid_base = self.FIRST + b * span
            break
        else:
            raise RuntimeError("every bench uid block is taken by another bench")
        self.prefix = f"nanorix-agent-bench-{secrets.token_hex(4)}"

    def contains(self, uid: int) -> bool:
        return self.uid_base <= uid < self.uid_base + self.span


def remove_cgroups(prefix: str) -> None:
    """rmdir every cgroup directory (bottom-up) under /sys/fs/cgroup/*/<prefix>."""
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        top = ctrl / prefix
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


# ----------------------------------------------------------------------------- OCI runtimes

RUNTIMES = ("crun", "runc")


def _oci_config(args: list[str], rootfs: Path, uid_base: int, cgroups_path: str) -> dict:
    """An OCI config close to the agent's sandbox and the bench tier."""
    ids = [{"containerID": 0, "hostID": uid_base, "size": SLOT}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 1000, "gid": 1000}, "args": args,
            "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "noNewPrivileges": True,
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "nrx-bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "size=64m", "nr_inodes=4096"]},
            {"destination": "/usr", "type": "bind", "source": "/usr",
             "options": ["rbind", "ro", "nosuid", "nodev"]},
        ],
        "linux": {
            "uidMappings": ids, "gidMappings": ids,
            "namespaces": [{"type": t} for t in
                           ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")],
            "cgroupsPath": cgroups_path,
            "resources": {"memory": {"limit": 268435456}, "pids": {"limit": 64},
                          "cpu": {"quota": 100000, "period": 100000}},
        },
    }


class OciRuntimes:
    """crun and runc, driven through one worker in a private mount namespace."""

    def __init__(self, tmp: Path, uid_base: int, prefix: str) -> None:
        self.available = [rt for rt in RUNTIMES if shutil.which(rt)]
        self.missing = [rt for rt in RUNTIMES if rt not in self.available]
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None
        if not self.available:
            return
        # its own directory, searchable (0755): the containers' root (a host uid of this
        # run's range) must reach the rootfs, and the run's temporary dir is 0700
        self.dir = Path(tempfile.mkdtemp(prefix="nrx-bench-oci-", dir=tmp.parent))
        self.dir.chmod(0o755)
        rootfs = self.dir / "rootfs"
        for d in ("usr", "proc", "dev", "tmp"):
            (rootfs / d).mkdir(parents=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            (rootfs / link).symlink_to(f"usr/{link}")
        setup = {"dir": str(self.dir), "rootfs": str(rootfs), "uid_base": uid_base,
                 "prefix": prefix}
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, __file__,
             "--oci-worker", json.dumps(setup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lock = threading.Lock()
        self.ask({"op": "ping"})

    def ask(self, req: dict):
        assert self.proc and self.proc.stdin and self.proc.stdout
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the OCI worker died")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{req.get('rt', '')} {req['op']}: {answer['error']}")
        return answer["ms"] if "ms" in answer else answer

    def run(self, rt: str) -> float:
        """`rt run` of `true`: the one-shot (create, start, wait, delete) in ms."""
        return self.ask({"op": "run", "rt": rt})

    def create_start_delete(self, rt: str) -> float:
        """`rt create`, `rt start` (`true`), `rt delete --force`, in ms."""
        return self.ask({"op": "csd", "rt": rt})

    def live(self, rt: str) -> str:
        """A started container idling in `sleep infinity`; returns its id."""
        return self.ask({"op": "live", "rt": rt})["id"]

    def exec_true(self, rt: str, cid: str) -> float:
        """`rt exec <live container> true` in ms."""
        return self.ask({"op": "exec", "rt": rt, "id": cid})

    def delete(self, rt: str, cid: str) -> None:
        self.ask({"op": "delete", "rt": rt, "id": cid})

    def concurrently(self, rt: str, op: str, k: int, per_client: int) -> tuple[float, list[float]]:
        """(operations per second, latencies in ms) of k clients doing per_client each."""
        a = self.ask({"op": "batch", "rt": rt, "what": op, "k": k, "n": per_client})
        return a["rate"], a["lat"]

    def version(self) -> str:
        return ", ".join(
            subprocess.run([rt, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
            for rt in self.available)

    def close(self) -> None:
        if self.proc:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            shutil.rmtree(self.dir, ignore_errors=True)
        remove_cgroups(self.prefix)


class _OciWorker:
    """Runs inside `unshare --mount`; answers one JSON line per request line."""

    def __init__(self, setup: dict) -> None:
        self.dir = Path(setup["dir"])
        self.rootfs = Path(setup["rootfs"])
        self.uid_base = setup["uid_base"]
        self.prefix = setup["prefix"]
        self.n = 0
        self.count_lock = threading.Lock()
        self.live_ids: dict[str, str] = {}
        self.logs = threading.local()
        self.hidden = self._hide_cgroup2()

    @staticmethod
    def _hide_cgroup2() -> bool:
        with open("/proc/self/mountinfo") as f:
            hybrid = any(line.split()[4] == "/sys/fs/cgroup/unified" for line in f)
        if hybrid:
            # (their stdout is the worker's answer channel: keep it clean)
            subprocess.run(["umount", "/sys/fs/cgroup/unified"], check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "nrx-bench-no-cgroup2",
                            "/sys/fs/cgroup/unified"], check=True, stdout=subprocess.DEVNULL)
        return hybrid

    def _bundle(self, rt: str, args: list[str]) -> tuple[str, Path]:
        with self.count_lock:
            self.n += 1
            cid = f"nrx-bench-{rt}-{self.n}"
        b = self.dir / "bundles" / cid
        b.mkdir(parents=True)
        (b / "config.json").write_text(json.dumps(
            _oci_config(args, self.rootfs, self.uid_base, f"/{self.prefix}/{cid}")))
        return cid, b

    def _rt(self, rt: str, *args: str) -> None:
        # stderr to a file, not a pipe: `create` leaves the container's init holding it
        log = getattr(self.logs, "f", None)
        if log is None:
            log = self.logs.f = tempfile.TemporaryFile(dir=self.dir)
        start = log.seek(0, os.SEEK_END)
        r = subprocess.run([rt, "--root", str(self.dir / f"state-{rt}"), *args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        if r.returncode:
            log.seek(start)
            raise RuntimeError(f"{rt} {args[0]} exited {r.returncode}: "
                               f"{log.read().decode(errors='replace')[-500:]}")

    def _done(self, cid: str, b: Path) -> None:
        shutil.rmtree(b, ignore_errors=True)
        if self.hidden:
            # crun leaves <path>/cgroup.procs in the stand-in tmpfs (not a cgroup, so its
            # rmdir fails): remove it, or the tmpfs fills up after a few hundred containers
            shutil.rmtree(Path("/sys/fs/cgroup/unified", self.prefix, cid), ignore_errors=True)

    def one(self, rt: str, what: str) -> float:
        """One timed operation (bundle made before the clock starts, removed after)."""
        cid, b = self._bundle(rt, ["/usr/bin/true"])
        try:
            t = time.perf_counter()
            if what == "run":
                self._rt(rt, "run", "--bundle", str(b), cid)
            elif what == "csd":
                self._rt(rt, "create", "--bundle", str(b), cid)
                self._rt(rt, "start", cid)
                self._rt(rt, "delete", "--force", cid)
            else:
                raise ValueError(what)
            ms = (time.perf_counter() - t) * 1000
        except BaseException:
            self._force_delete(rt, cid)
            raise
        finally:
            self._done(cid, b)
        return ms

    def _force_delete(self, rt: str, cid: str) -> None:
        subprocess.run([rt, "--root", str(self.dir / f"state-{rt}"), "delete", "--force", cid],
                       capture_output=True)

    def handle(self, req: dict) -> dict:
        op, rt = req["op"], req.get("rt", "")
        if op == "ping":
            return {"ok": True}
        if op in ("run", "csd"):
            return {"ms": self.one(rt, op)}
        if op == "live":
            cid, b = self._bundle(rt, ["/usr/bin/sleep", "infinity"])
            self.live_ids[cid] = rt
            self._rt(rt, "create", "--bundle", str(b), cid)
            self._rt(rt, "start", cid)
            return {"id": cid}
        if op == "exec":
            t = time.perf_counter()
            self._rt(rt, "exec", req["id"], "/usr/bin/true")
            return {"ms": (time.perf_counter() - t) * 1000}
        if op == "delete":
            self._rt(rt, "delete", "--force", req["id"])
            self.live_ids.pop(req["id"], None)
            self._done(req["id"], self.dir / "bundles" / req["id"])
            return {"ok": True}
        if op == "batch":
            return self.batch(rt, req["what"], req["k"], req["n"])
        raise ValueError(op)

    def batch(self, rt: str, what: str, k: int, n: int) -> dict:
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(k) as ex:
            per = list(ex.map(lambda _i: [self.one(rt, what) for _ in range(n)], range(k)))
        wall = time.perf_counter() - t
        lat = [x for xs in per for x in xs]
        return {"rate": len(lat) / wall, "lat": lat}

    def serve(self) -> None:
        try:
            for line in sys.stdin:
                try:
                    answer = self.handle(json.loads(line))
                except Exception as e:  # reported to the bench, which stops with it
                    answer = {"error": str(e)}
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()
        finally:
            for cid, rt in list(self.live_ids.items()):
                self._force_delete(rt, cid)


# ----------------------------------------------------------------------------- the C floor

class Floor:
    """bench/floor/floor.c, built into the run's temporary dir."""

    SOURCE = HERE / "floor" / "floor.c"

    def __init__(self, tmp: Path, uid_base: int, prefix: str) -> None:
        self.tmp, self.uid_base, self.prefix = tmp, uid_base, prefix
        self.binary = tmp / "nrx-floor"
        self.missing = ""
        self._serial: subprocess.Popen | None = None
        cc = shutil.which("cc")
        if not cc:
            self.missing = "no C compiler (apt-get install build-essential)"
            return
        r = subprocess.run([cc, "-O2", "-o", str(self.binary), str(self.SOURCE), "-lsodium"],
                           capture_output=True, text=True)
        if r.returncode:
            self.missing = f"floor.c did not build (libsodium-dev?): {r.stderr[-300:]}"

    def _argv(self, j: int, n: int) -> list[str]:
        work = self.tmp / f"floor-{j}"
        work.mkdir(exist_ok=True)
        return [str(self.binary), "-n", str(n), "-u", str(self.uid_base + j * SLOT),
                "-p", f"{self.prefix}-{j}", "-d", str(work)]

    def one(self) -> list[float]:
        """One lifecycle from a floor process kept running between calls: its ms in all,
        then of create + exec `true`, destroy, and the signed, fsynced proof."""
        if self._serial is None:
            self._serial = subprocess.Popen(self._argv(0, 0), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
        self._serial.stdin.write("\n")
        self._serial.stdin.flush()
        line = self._serial.stdout.readline()
        if not line:
            raise RuntimeError("nrx-floor failed")
        return [float(x) for x in line.split()]

    def concurrently(self, k: int, per_client: int) -> tuple[float, list[float]]:
        """(lifecycles per second, latencies in ms) of k floor processes, per_client each;
        the rate's wall time includes the k process starts (~1 ms each)."""
        t = time.perf_counter()
        procs = [subprocess.Popen(self._argv(j + 1, per_client), stdout=subprocess.PIPE, text=True)
                 for j in range(k)]
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t
        if any(p.returncode for p in procs):
            raise RuntimeError("nrx-floor failed")
        lat = [float(line.split()[0]) for out in outs for line in out.splitlines()]
        return len(lat) / wall, lat

    def close(self) -> None:
        if self._serial is not None:
            self._serial.stdin.close()
            self._serial.wait()
            self._serial = None
        for j in range(0, 64):
            remove_cgroups(f"{self.prefix}-{j}")


# ----------------------------------------------------------------------------- together

class Peers:
    """Every peer of one bench run: the OCI runtimes (uid slot 0 of `uid_base`) and the
    floor (slots 1..k); `skipped` says which are missing and why."""

    def __init__(self, tmp: Path, uid_base: int, prefix: str) -> None:
        self.oci = OciRuntimes(tmp, uid_base, f"{prefix}-oci")
        self.floor = Floor(tmp, uid_base + SLOT, f"{prefix}-floor")
        self.skipped = [f"{rt}: not installed (apt-get install {rt})" for rt in self.oci.missing]
        if self.floor.missing:
            self.skipped.append(f"C floor: {self.floor.missing}")

    def versions(self) -> str:
        return self.oci.version() if self.oci.available else ""

    def close(self) -> None:
        try:
            self.oci.close()
        finally:
            self.floor.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--oci-worker"]:
    _OciWorker(json.loads(sys.argv[2])).serve()
