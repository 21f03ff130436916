"""nanorix-agent benchmarks against bubblewrap, measured in the same run.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # fewer iterations, smaller density
    .venv/bin/python bench/run.py --only transport   # exec round trip and lifecycle over
                                                      # the unix socket and over mTLS
    .venv/bin/python bench/run.py --only destroy     # destroy with 0/50/200 idle sessions

Starts a real daemon on a temporary socket (temporary state/runtime dirs, its own
cgroup prefix and host uid range), drives it with a plain msgpack-rpc client, and runs bubblewrap with an
equivalent sandbox (user, mount, pid, net, ipc, uts, cgroup namespaces; tmpfs root;
read-only /usr; /proc; /dev) alternating with the agent, run by run.  Prints one table
with medians, p95/p99 and min-max and the peer's figures beside ours.  Goals are
printed beside each figure; they are reported, never asserted.  Every destroy's
status is counted (a lifecycle only counts as fast if its proof says every step was
verified), and after the daemon stopped the run checks that nothing is left behind:
no cgroup under its prefix, no mount under its temporary dir, no process in its uid
range.  Set NRX_BENCH_LOG=info to keep the daemon's log (in the temporary dir).
crun, runc and the C floor (bench/peers.py, bench/floor/) are peers the same way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import peers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BWRAP = [
    "bwrap", "--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000",
    "--die-with-parent", "--tmpfs", "/", "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
    "--proc", "/proc", "--dev", "/dev", "--hostname", "nrx-bench", "--chdir", "/",
]

BENCH_CONFIG = """
[node]
max_sessions = 1100
# idle density sessions overcommit their caps on purpose: the cap is a limit, not a reservation
memory_capacity_bytes = 1099511627776
[log]
level = "{level}"
[health]
interval_seconds = 3600
[sandbox]
cgroup_prefix = "{prefix}"
# a host uid range of its own, far from the default one tests and other agents use
uid_base = {uid_base}
[tiers.bench]
max_concurrent = 0
max_ttl_seconds = 0
default_ttl_seconds = 3600
memory_bytes = 268435456
tmpfs_inodes = 4096
pids_max = 64
cpu_percent = 100
"""


# ----------------------------------------------------------------------------- stats

def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": statistics.median(xs), "p95": pct(xs, 95), "p99": pct(xs, 99),
            "min": min(xs), "max": max(xs)}


# ----------------------------------------------------------------------------- client

class Client:
    """A minimal blocking msgpack-rpc client (one request at a time per instance)."""

    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self.msgid = 0

    def call(self, method: str, params: dict | None = None, on_note=None):
        self.msgid += 1
        mid = self.msgid
        self.sock.sendall(msgpack.packb([0, mid, method, [params or {}]], use_bin_type=True))
        while True:
            for msg in self.unpacker:
                if msg[0] == 2:
                    if on_note:
                        on_note(msg)
                    continue
                if msg[0] == 1 and msg[1] == mid:
                    if msg[2] is not None:
                        raise RuntimeError(f"{method}: {msg[2]}")
                    return msg[3]
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(self, tmp: Path, extra_config: str = "",
                 ident: peers.RunIdentity | None = None) -> None:
        self.tmp = tmp
        # a random claimed uid block and cgroup prefix unless the caller shares its own
        self.ident = ident = ident or peers.RunIdentity(RUN_SPAN)
        self.prefix = ident.prefix
        self.uid_base = ident.uid_base
        cfg = tmp / "agent.toml"
        cfg.write_text(BENCH_CONFIG.format(prefix=self.prefix, uid_base=self.uid_base,
                                           level=os.environ.get("NRX_BENCH_LOG", "warning"))
                       + extra_config)
        self.state, self.run = tmp / "state", tmp / "run"
        self.state.mkdir()
        self.run.mkdir()
        self.sock = str(self.run / "agent.sock")
        self.log = open(tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(cfg),
             "--state-dir", str(self.state), "--runtime-dir", str(self.run)],
            stdout=self.log, stderr=self.log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited: " + (tmp / "agent.log").read_text()[-3000:])
            try:
                c = Client(self.sock)
                c.call("agent.info")
                c.close()
                return
            except (OSError, RuntimeError):
                time.sleep(0.05)
        raise RuntimeError("daemon did not become ready")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_ms(self) -> float:
        """CPU time of the daemon (all threads) and of its reaped children (nrx-init), ms."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# a fixed range, only for bench scripts that pick their own (run.py takes a random block)
UID_BASE = 3_000_000_000
UID_SPAN = 65536 * 1100  # uid_slot_size * max_sessions
# the agent's range, then one slot per peer container range and floor process
RUN_SPAN = UID_SPAN + 64 * peers.SLOT


def leftovers(d: Daemon) -> list[str]:
    """What the stopped daemon and the peers left behind: cgroups under the run's prefix,
    mounts under its temporary dir, processes in its uid range, the daemon alive."""
    out = []
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        out += [f"cgroup {ctrl.name}/{cg.name}" for cg in ctrl.glob(f"{d.prefix}*")]
    with open("/proc/self/mountinfo") as f:
        n = sum(1 for line in f if str(d.tmp) in line)
    if n:
        out.append(f"{n} mounts under {d.tmp}")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if d.ident.contains(uid):
            out.append(f"process {pid} in the bench uid range")
    if d.proc.poll() is None:
        out.append("daemon still running")
    return out


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- pieces

def create(c: Client, customer="bench") -> str:
    return c.call("session.create", {"customer_id": customer, "tier": "bench"})["session_id"]


def exec_true(c: Client, sid: str) -> None:
    r = c.call("session.exec", {"session_id": sid, "command": "true"})
    if r["exit_code"] != 0:
        raise RuntimeError(f"exec true failed: {r}")


def destroy(c: Client, sid: str) -> dict:
    return c.call("session.destroy", {"session_id": sid})


STATUSES: dict[str, int] = {}
_STATUS_LOCK = threading.Lock()


def count_status(r: dict) -> dict:
    if not r["cdp"]["attestation"]["signature"]:
        raise RuntimeError("destroy returned no signed CDP")
    key = f"{r['status']}/{r['cdp']['destruction_state']}"
    with _STATUS_LOCK:
        STATUSES[key] = STATUSES.get(key, 0) + 1
    return r


def lifecycle(c: Client) -> None:
    sid = create(c)
    exec_true(c, sid)
    count_status(destroy(c, sid))


def bwrap_true() -> None:
    subprocess.run([*BWRAP, "/bin/true"], check=True)


def timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return (time.perf_counter() - t) * 1000


def peer_row(label: str, ours: dict, peer: list[float], goal: str = "") -> tuple:
    """A row under one of ours: the peer's figures and our p50 as a multiple of its p50."""
    sp = summary(peer)
    return (f"  peer: {label}", None, sp, f"ours {ours['p50'] / sp['p50']:.2f}x its p50{goal}")


# ----------------------------------------------------------------------------- benches

POOL_SIZE = 4
# the main daemon keeps the pre-pool behaviour (every row above compares with the runs
# before issue 18); the warm-pool row runs a second daemon with a pool of the bench tier
NO_POOL = "[pool.sizes]\nfree = 0\n"
WARM_POOL = f"[pool]\nrefill_concurrency = 1\n[pool.sizes]\nfree = 0\nbench = {POOL_SIZE}\n"


def _pool_ready(c: Client, want: int, timeout: float = 10.0) -> bool:
    """Wait (polling agent.info) until the bench tier's pool holds `want` members."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.call("agent.info")["capacity"]["pool_by_tier"].get("bench", 0) >= want:
            return True
        time.sleep(0.002)
    return False


def bench_warm_pool(td: Path, n: int, rows: list, cold: dict | None) -> None:
    """session.create and create + exec `true` when a ready sandbox waits in the pool
    (issue 18), alternating with bwrap one-shots; the pool is refilled (and waited for)
    between runs, off the clock.  `cold`: the same figures of the main daemon (no pool)."""
    (td / "pool").mkdir()
    d = Daemon(td / "pool", WARM_POOL)
    try:
        c = Client(d.sock)
        ours, creates, peer, misses = [], [], [], 0
        for _ in range(n):
            if not _pool_ready(c, POOL_SIZE):
                misses += 1
            t = time.perf_counter()
            sid = create(c)
            creates.append((time.perf_counter() - t) * 1000)
            exec_true(c, sid)
            ours.append((time.perf_counter() - t) * 1000)
            count_status(destroy(c, sid))
            peer.append(timed(bwrap_true))
        c.close()
    finally:
        d.stop()
        left = leftovers(d)
    so, sc, sp = summary(ours), summary(creates), summary(peer)
    rows.append(("warm pool: create + exec `true` (ms)", so, sp,
                 f"ours {so['p50'] / sp['p50']:.2f}x bwrap one-shot (goal <= 0.5)"
                 + (f"; cold {cold['ours']['p50'] / so['p50']:.1f}x slower" if cold else "")))
    rows.append(("  of which session.create from the pool (ms)", sc, None,
                 "goal p50 <= 1 ms" + (f"; cold {cold['create']['p50']:.2f} ms" if cold else "")
                 + (f"; pool not refilled in time {misses}x" if misses else "")
                 + (f"; LEFT BEHIND: {'; '.join(left)}" if left else "")))
    if left:
        POOL_LEFT.extend(left)


POOL_LEFT: list[str] = []
COLD: dict = {}  # the cold create figures of bench_create_exec, for the warm-pool row

def bench_create_exec(d: Daemon, n: int, rows: list, px: peers.Peers) -> None:
    c = Client(d.sock)
    ours, peer, kill_ms, create_ms = [], [], [], []
    oci: dict[str, list[float]] = {rt: [] for rt in px.oci.available}
    for _ in range(n):
        t = time.perf_counter()
        sid = create(c)
        create_ms.append((time.perf_counter() - t) * 1000)
        exec_true(c, sid)
        ours.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        count_status(destroy(c, sid))
        kill_ms.append((time.perf_counter() - t) * 1000)
        peer.append(timed(bwrap_true))
        for rt, xs in oci.items():
            xs.append(px.oci.run(rt))
    c.close()
    so, sp = summary(ours), summary(peer)
    COLD.update(ours=so, create=summary(create_ms))
    rows.append(("create + exec `true` (ms)", so, sp,
                 f"ours {so['p50'] / sp['p50']:.2f}x bwrap one-shot (goal <= 1.0, <= 0.5 warm pool)"))
    rows += [peer_row(f"{rt} run `true` (one-shot)", so, xs) for rt, xs in oci.items()]
    rows.append(("  of which session.create (ms)", summary(create_ms), None,
                 "sandbox + session key + journal row"))
    rows.append(("destroy alone, empty session, signed CDP (ms)", summary(kill_ms), None,
                 "8 steps + proof spooled (fsync)"))


def bench_exec_rtt(d: Daemon, n: int, rows: list, px: peers.Peers) -> None:
    c = Client(d.sock)
    sid = create(c)
    live = {rt: px.oci.live(rt) for rt in px.oci.available}
    xs, oci = [], {rt: [] for rt in live}
    try:
        for _ in range(n):
            xs.append(timed(exec_true, c, sid))
            for rt, cid in live.items():
                oci[rt].append(px.oci.exec_true(rt, cid))
    finally:
        for rt, cid in live.items():
            px.oci.delete(rt, cid)
    count_status(destroy(c, sid))
    c.close()
    so = summary(xs)
    rows.append(("exec `true` round trip, live session (ms)", so, None, "goal p50 <= 2 ms"))
    rows += [peer_row(f"{rt} exec `true` into a live container", so, ys,
                      " (goal <= 0.4x crun exec)" if rt == "crun" else "") for rt, ys in oci.items()]


def bench_lifecycle(d: Daemon, n: int, rows: list, px: peers.Peers) -> None:
    c = Client(d.sock)
    ours, peer, floor = [], [], []
    oci: dict[str, list[float]] = {rt: [] for rt in px.oci.available}
    for _ in range(n):
        ours.append(timed(lifecycle, c))
        peer.append(timed(bwrap_true))
        if not px.floor.missing:
            floor.append(px.floor.one())
        for rt, xs in oci.items():
            xs.append(px.oci.create_start_delete(rt))
    c.close()
    so = summary(ours)
    rows.append(("full lifecycle create/exec/destroy+CDP (ms)", so, summary(peer),
                 "goal p50 <= 15 ms; peer: bwrap one-shot"))
    if floor:
        split = ", ".join(f"{what} {statistics.median(f[i] for f in floor):.1f}"
                          for i, what in ((1, "create+exec"), (2, "destroy"), (3, "proof")))
        rows.append(peer_row("C floor (bench/floor), same kernel work", so, [f[0] for f in floor],
                             f" (goal <= 2.5x); floor p50s: {split} ms"))
    rows += [peer_row(f"{rt} create/start/delete `true`", so, xs) for rt, xs in oci.items()]


class Tls:
    """The [remote] side of the transport rows: certificates made with tests/pki.py, a free
    loopback port, and clients that present the listed client certificate."""

    def __init__(self, tmp: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from pki import Pki

        self.pki = Pki(tmp / "pki")
        self.pki.issue("node", "node-1", server=True)
        self.pki.issue("client", "control-plane")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        b = self.pki.base
        self.config = (f'\n[remote]\nlisten = "127.0.0.1:{self.port}"\ncert = "{b}/node.crt"\n'
                       f'key = "{b}/node.key"\nclient_ca = "{b}/ca.crt"\n'
                       'allowed_clients = ["control-plane"]\n')

    def client(self) -> Client:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.pki.base / "ca.crt"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.pki.base / "client.crt", self.pki.base / "client.key")
        raw = socket.create_connection(("127.0.0.1", self.port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Client("", sock=ctx.wrap_socket(raw, server_hostname="localhost"))


def bench_transport(d: Daemon, tls: Tls, n: int, rows: list) -> None:
    """Exec round trip and full lifecycle over the unix socket and over mTLS, alternating
    run by run on one live daemon (one connection per transport, set up once)."""
    clients = {"unix": Client(d.sock), "mTLS": tls.client()}
    sids = {k: create(c) for k, c in clients.items()}
    rtt: dict[str, list[float]] = {k: [] for k in clients}
    life: dict[str, list[float]] = {k: [] for k in clients}
    for _ in range(n * 2):
        for k, c in clients.items():
            rtt[k].append(timed(exec_true, c, sids[k]))
    for _ in range(n):
        for k, c in clients.items():
            life[k].append(timed(lifecycle, c))
    for k, c in clients.items():
        count_status(destroy(c, sids[k]))
        c.close()
    for k in clients:
        rows.append((f"exec `true` round trip over {k} (ms)", summary(rtt[k]), None,
                     "same daemon, alternating"))
    for k in clients:
        rows.append((f"full lifecycle over {k} (ms)", summary(life[k]), None,
                     "create/exec/destroy+CDP"))
    tls_conn = timed(lambda: tls.client().close())
    rows.append(("mTLS connect + handshake (ms)", {"p50": tls_conn, "p95": tls_conn,
                                                   "p99": tls_conn, "min": tls_conn,
                                                   "max": tls_conn, "n": 1}, None,
                 "once; a control plane keeps its connection"))


def _concurrently(k: int, per_client: int, one) -> tuple[float, list[float]]:
    """(runs per second, latencies in ms) of `per_client` runs of one() in each of k threads."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(_i):
        mine = one(per_client)
        with lock:
            lat.extend(mine)

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(k) as ex:
        list(ex.map(worker, range(k)))
    return len(lat) / (time.perf_counter() - t), lat


def bench_throughput(d: Daemon, per_client: int, rows: list, px: peers.Peers,
                     oci_too: bool) -> None:
    def agent_runs(n):
        c = Client(d.sock)
        try:
            return [timed(lifecycle, c) for _ in range(n)]
        finally:
            c.close()

    def peer_runs(n):
        return [timed(bwrap_true) for _ in range(n)]

    for k in (1, 4, 16):
        cpu = d.cpu_ms()
        rate, lat = _concurrently(k, per_client, agent_runs)
        cpu = (d.cpu_ms() - cpu) / len(lat)
        prate, plat = _concurrently(k, per_client, peer_runs)
        goal = " (goal >= 100/s, p99 <= 200 ms)" if k == 16 else ""
        so = summary(lat)
        rows.append((f"throughput, {k} clients (lifecycle ms)", so, summary(plat),
                     f"{rate:.0f} lifecycles/s{goal}, daemon CPU {cpu:.1f} ms each; bwrap "
                     f"{prate:.0f} one-shots/s (ours {rate / prate:.2f}x)"))
        if not px.floor.missing:
            frate, flat = px.floor.concurrently(k, per_client)
            rows.append(peer_row(f"C floor, {k} processes (lifecycle ms)", so, flat,
                                 f"; {frate:.0f} lifecycles/s, ours {rate / frate:.2f}x that"))
        for rt in px.oci.available if oci_too else ():
            orate, olat = px.oci.concurrently(rt, "run", k, per_client)
            rows.append(peer_row(f"{rt} run `true`, {k} clients (ms)", so, olat,
                                 f"; {orate:.0f} one-shots/s, ours {rate / orate:.2f}x that"))


def _cgroup_charged(d: Daemon) -> int:
    """Bytes charged to every session's memory cgroup (the prefix's hierarchical total)."""
    try:
        return int((Path("/sys/fs/cgroup/memory") / d.prefix / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return -1


def destroy_all(d: Daemon, sids: list[str], clients: int = 4) -> float:
    """Destroy every session from `clients` connections; returns the seconds taken."""
    def destroy_chunk(chunk):
        cc = Client(d.sock)
        try:
            for sid in chunk:
                count_status(destroy(cc, sid))
        finally:
            cc.close()

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        list(ex.map(destroy_chunk, [sids[i::clients] for i in range(clients)]))
    return time.perf_counter() - t


def bench_density(d: Daemon, sizes: list[int], rows: list) -> None:
    c = Client(d.sock)
    for n in sizes:
        base_avail, base_rss = mem_available_kib(), d.rss_kib()
        t = time.perf_counter()
        sids = [create(c, customer=f"density-{i % 50}") for i in range(n)]
        create_s = time.perf_counter() - t
        time.sleep(1.0)
        used = base_avail - mem_available_kib()
        rss = d.rss_kib()
        charged = _cgroup_charged(d)
        per = used / n / 1024
        cg = f", {charged / n / (1 << 20):.2f} MiB charged to its cgroup" if charged >= 0 else ""
        destroy_s = destroy_all(d, sids)
        rows.append((f"density: {n} idle sessions", None, None,
                     f"host {per:.2f} MiB/session{cg}; agent RSS {rss / 1024:.0f} MiB "
                     f"(+{(rss - base_rss) / 1024:.0f}); created in {create_s:.1f} s, destroyed "
                     f"(4 clients) in {destroy_s:.1f} s (goal 1000: <= 1 MiB each, agent <= 200 MiB)"))
    c.close()


def bench_destroy_idle(d: Daemon, sizes: list[int], n: int, rows: list) -> None:
    """Destroy p50 of a fresh session (created, `true` run) while N idle sessions stay
    alive, against the same with none: what host-wide scans cost per live session."""
    c = Client(d.sock)
    base: dict | None = None
    for size in sizes:
        idle = [create(c, customer=f"idle-{i % 50}") for i in range(size)]
        xs = []
        for _ in range(n):
            sid = create(c)
            exec_true(c, sid)
            t = time.perf_counter()
            count_status(destroy(c, sid))
            xs.append((time.perf_counter() - t) * 1000)
        destroy_all(d, idle)
        s = summary(xs)
        base = base or s
        rows.append((f"destroy with {size} live idle sessions (ms)", s, None,
                     f"{s['p50'] / base['p50']:.2f}x the empty node"
                     + (" (goal <= 1.2x)" if size else "")))
    c.close()


def bench_streaming(d: Daemon, rows: list) -> None:
    c = Client(d.sock)
    sid = create(c)
    got = [0]
    peak = [d.rss_kib()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], d.rss_kib())
            time.sleep(0.01)

    th = threading.Thread(target=sample)
    th.start()

    def note(msg):
        got[0] += len(msg[2][0]["data"])

    t = time.perf_counter()
    c.call("session.exec", {"session_id": sid, "command": "head -c 100000000 /dev/zero",
                            "stream": True}, on_note=note)
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    count_status(destroy(c, sid))
    c.close()
    # peer: the same command in bwrap, its stdout read through a pipe in 1 MiB reads
    t = time.perf_counter()
    p = subprocess.Popen([*BWRAP, "/bin/sh", "-c", "head -c 100000000 /dev/zero"],
                         stdout=subprocess.PIPE)
    pgot = 0
    while chunk := p.stdout.read1(1 << 20):
        pgot += len(chunk)
    p.wait()
    pwall = time.perf_counter() - t
    rows.append(("streaming 100 MB stdout", None, None,
                 f"{got[0] / wall / 1e6:.0f} MB/s through the socket ({got[0] / 1e6:.0f} MB), "
                 f"agent peak RSS {peak[0] / 1024:.0f} MiB; bwrap to a pipe "
                 f"{pgot / pwall / 1e6:.0f} MB/s"))


def bench_cdp(rows: list) -> None:
    import json

    from agent.cdp import document, verify
    from agent.keys.attestation import AttestationKeyStore

    vec = ROOT / "tests" / "vectors" / "cdp-v1.json"
    ev = json.loads(vec.read_text())["cdp"]["evidence"]
    with tempfile.TemporaryDirectory() as td:
        signer = AttestationKeyStore(Path(td), 86400).current()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            doc = document.build_cdp(session_id="sess_a8f3e71c4b2d9f06",
                                     created_at="2026-03-01T14:00:00Z",
                                     destroyed_at="2026-03-01T14:30:00Z", evidence=ev,
                                     signer=signer)
            n += 1
        build = n / (time.perf_counter() - t)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            assert verify.verify(doc)["valid"]
            n += 1
        ver = n / (time.perf_counter() - t)
    rows.append(("CDP build + sign / verify", None, None, f"{build:.0f}/s build+sign, {ver:.0f}/s verify"))


def bench_wipe(rows: list) -> None:
    from agent import fsops

    size = 64 << 20
    with tempfile.TemporaryDirectory(dir="/dev/shm") as td:
        p = Path(td) / "f"
        p.write_bytes(os.urandom(size))
        fd = os.open(p, os.O_RDWR)
        try:
            t = time.perf_counter()
            fsops.wipe_ranges(fd, [(0, size)], ["zeros"])
            file_gibs = size / (time.perf_counter() - t) / (1 << 30)
        finally:
            os.close(fd)
    # process memory: a child of ours holding 64 MiB, stopped while we wipe it
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys,os; b=bytearray(os.urandom(64<<20)); "
                              "sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        os.kill(child.pid, 19)  # SIGSTOP
        ranges = fsops.present_ranges(child.pid)
        total = sum(length for _addr, length in ranges)
        fd = os.open(f"/proc/{child.pid}/mem", os.O_RDWR)
        try:
            t = time.perf_counter()
            fsops.wipe_ranges(fd, ranges, ["zeros"])
            mem_gibs = total / (time.perf_counter() - t) / (1 << 30)
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
    rows.append(("wipe throughput per pass, 64 MiB", None, None,
                 f"tmpfs file {file_gibs:.2f} GiB/s (goal >= 2), process memory "
                 f"{mem_gibs:.2f} GiB/s over {total >> 20} MiB (goal >= 1)"))


# ----------------------------------------------------------------------------- output

def fmt(s: dict | None) -> str:
    if not s:
        return "-"
    return (f"{s['p50']:.2f} / {s['p95']:.2f} / {s['p99']:.2f} ({s['min']:.2f}-{s['max']:.2f}) n={s['n']}")


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30))
    cg = ("cgroup v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists()
          else "cgroup v1/hybrid")
    return (f"{platform.node()}: {os.cpu_count()} x {cpu}, {mem} GiB, {cg}, kernel "
            f"{platform.release()}, Python {platform.python_version()}, "
            f"{subprocess.run(['bwrap', '--version'], capture_output=True, text=True).stdout.strip()}")


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--only", choices=("all", "transport", "pool", "destroy"), default="all",
                    help="transport: just the unix-socket vs mTLS rows (about a minute); "
                         "pool: create + exec cold, then from a warm pool; destroy: the "
                         "destroy vs live idle sessions rows (bench/destroy_idle.py: per step)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    if args.only == "all" and not shutil.which("bwrap"):
        print("bench needs bubblewrap: apt-get install bubblewrap", file=sys.stderr)
        return 2
    n = 30 if args.quick else 200
    rows: list = []
    t_start = time.perf_counter()
    # as the systemd unit does (LimitNOFILE): 1,000 sessions hold a few fds each
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ident = peers.RunIdentity(RUN_SPAN)
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nrx-bench-") as td:
        px = peers.Peers(Path(td), ident.uid_base + UID_SPAN, ident.prefix)
        print(f"machine: {machine()}" + (f"; {px.versions()}" if px.versions() else ""),
              flush=True)
        print(f"at start: {load()}; uid base {ident.uid_base}, cgroup prefix {ident.prefix}")
        for why in px.skipped:
            print(f"skipped peer: {why}")
        try:
            tls = Tls(Path(td))
            d = Daemon(Path(td), tls.config + NO_POOL, ident=ident)
        except BaseException:
            px.close()
            raise
        warm = ("warm pool", lambda: bench_warm_pool(Path(td), n, rows, COLD))
        destroy_idle = ("destroy vs idle", lambda: bench_destroy_idle(
            d, [0, 200] if args.quick else [0, 50, 200], 10 if args.quick else 40, rows))
        benches = [
            ("transport", lambda: bench_transport(d, tls, n, rows)),
        ] if args.only == "transport" else [
            ("create+exec", lambda: bench_create_exec(d, n, rows, px)), warm,
        ] if args.only == "pool" else [
            destroy_idle,
        ] if args.only == "destroy" else [
            ("create+exec", lambda: bench_create_exec(d, n, rows, px)), warm,
            ("exec rtt", lambda: bench_exec_rtt(d, n * 2, rows, px)),
            ("lifecycle", lambda: bench_lifecycle(d, n, rows, px)),
            ("throughput", lambda: bench_throughput(d, 10 if args.quick else 40, rows, px,
                                                    not args.quick)),
            destroy_idle,
            ("streaming", lambda: bench_streaming(d, rows)),
            ("density", lambda: bench_density(d, [100] if args.quick else [100, 500, 1000],
                                              rows)),
            ("transport", lambda: bench_transport(d, tls, n, rows)),
        ]
        try:
            for name, fn in benches:
                t = time.perf_counter()
                fn()
                print(f"... {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        finally:
            d.stop()
            px.close()
            left = leftovers(d) + POOL_LEFT
    if args.only == "all":
        bench_wipe(rows)
        bench_cdp(rows)
    print()
    print(f"{'what':<52} | {'nanorix-agent p50 / p95 / p99 (min-max)':<44} | "
          f"{'peer (bwrap unless named) p50 / p95 / p99':<44} | note")
    print("-" * 180)
    for what, ours, peer, note in rows:
        print(f"{what:<52} | {fmt(ours):<44} | {fmt(peer):<44} | {note}")
    total = sum(STATUSES.values())
    clean = STATUSES.get("destroyed/complete", 0)
    print(f"destroys: {clean}/{total} destroyed with every step verified"
          + ("" if clean == total else f" (others: {STATUSES})"))
    print("left behind after the daemon stopped: " + ("; ".join(left) if left else "nothing "
          "(no cgroup under the prefix, no mount, no process in the uid range)"))
    print(f"bench wall time: {time.perf_counter() - t_start:.0f} s; at the end: {load()}")
    return 0 if not left and clean == total else 1


if __name__ == "__main__":
    sys.exit(main())
