"""Circuit breaker on N real daemon processes (a devnet on 127.0.0.1, one machine).

- **footprint**: RSS of every node process, whether any mapped torch, and the CPU all the
  nodes use together while idle (no votes moving) over ``--idle-s`` seconds.
- **halt latency**: every node holds the same genesis stake (ledger r3 ``stakes``, so no stake
  transactions are needed before voting); for each trial a fresh model gets
  ceil(N/3) - 1 halt votes (under the 1/3 threshold), then one more vote reaches it. The
  latency is from that vote's timestamp (the voter's clock) to the moment the *last* node
  applied the halt (``halted_since_ms`` from ``breaker.wait_state``, each node's clock: all
  on one machine, so one clock). p50/p99 over the trials. Target: p99 < 2 s. The trials
  start once the devnet's start-up work has died down (``--settle-start``, at most 120 s by
  default; 0 starts at once): 50 nodes that have just joined spend ~20-25 ms/s of CPU each
  on Kademlia refreshes, mesh building and first catch-ups, against ~6-9 ms/s once settled,
  which on 2 cores slows the first trials (a steady network is what the target is about).
- **burst delivery**: 1,000 votes across 100 models, cast at once from every node (N x
  1000/N distinct voter/model pairs, each node over one control connection); the delivery
  ratio is the smallest fraction of them any node counts within the gossip window
  (``--burst-wait`` seconds after the first vote, or when the cast ends if that is later),
  then again ``--burst-wait + --settle`` seconds after the first vote (the settle phase, in
  which anti-entropy repairs what gossip lost), with the time until every node counted every
  vote, how many votes anti-entropy repaired, and when the validator's ledger had recorded
  them all. Target: 100%.

Bounded: every control call has a timeout, the whole run has ``--deadline``; the devnet and
every node process are stopped on exit, on error and on SIGTERM/SIGINT (SIGKILL after 60 s).

    python scripts/bench/breaker.py [--nodes 50] [--trials 20] [--burst 1000] [--models 100]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prsm_node.control.client import ControlClient

CLK_TCK = os.sysconf("SC_CLK_TCK")
STAKE = 100 * 10**18  # genesis stake of every node (100 FTNS)


def call(home: str, method: str, **params: Any) -> Any:
    """One control call; ``timeout`` in params is also the daemon-side wait."""
    wait = float(params.get("timeout", 30.0))
    with ControlClient(Path(home) / "control.sock", timeout=wait + 30) as client:
        return client.call(method, params)


def model_id(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Devnet:
    """The nodes of a devnet, forked by this process in waves and always stopped.

    ``prsm-node devnet`` starts every node at once, and 49 nodes dialling one bootstrap peer
    on a saturated 2-core machine left some with an empty routing table; here each wave of
    ``wave`` nodes joins before the next starts. Nodes are this process's children: on exit,
    error or signal each gets SIGTERM, then SIGKILL after 30 s (prsm_node.devnet.stop_all).
    """

    def __init__(self, directory: Path, nodes: int, wave: int = 10, stake: int = 0) -> None:
        self.stake = stake
        self.directory = directory
        self.nodes = nodes
        self.wave = wave
        self.pids: list[int] = []
        self.homes: list[str] = []
        self._by_index: dict[int, int] = {}

    def __enter__(self) -> Devnet:
        import prsm_node.node  # noqa: F401  warm the import once; every fork inherits it
        from prsm_node import devnet

        started = time.monotonic()
        try:
            members = devnet.create(self.directory, self.nodes, stake=self.stake)
            self.homes = [m.home for m in members]
            peers_txt = self.directory / devnet.NETWORK_DIR / "peers.txt"
            for first in range(0, self.nodes, self.wave):
                batch = members[first : first + self.wave]
                if first:  # spread the joins over nodes already up, not node0 alone
                    joined = [m.addr for m in members[:first]][:: max(1, first // 8)]
                    peers_txt.write_text("# bootstrap peers of this devnet\n" + "\n".join(joined) + "\n")
                for m in batch:
                    self._by_index[m.index] = devnet.spawn(m)
                    self.pids.append(self._by_index[m.index])
                devnet.wait_ready(batch, table_size=min(first or 1, 4) if first else 0, timeout=300)
            devnet.wait_ready(members, table_size=min(self.nodes - 1, 4), timeout=300)
        except BaseException:
            self.__exit__()
            raise
        print(f"devnet of {self.nodes} ready in {time.monotonic() - started:.1f} s (waves of {self.wave})", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        from prsm_node import devnet

        # A second signal must not interrupt the cleanup.
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = devnet.stop_all(self._by_index, timeout=30.0)
            killed = sum(1 for c in codes.values() if c == -signal.SIGKILL)
        except (ChildProcessError, OSError) as err:  # already reaped or gone: SIGKILL what is left below
            print(f"stopping the nodes: {err!r}", flush=True)
            codes, killed = {}, 0
        finally:
            for pid in self.pids:
                if alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for sig, handler in old.items():
                signal.signal(sig, handler)
        left = [p for p in self.pids if alive(p)]
        print(f"devnet stopped: {len(codes)} nodes, {killed} needed SIGKILL, {len(left)} left", flush=True)


def each(pool: ThreadPoolExecutor, homes: list[str], method: str, **params: Any) -> list[Any]:
    return list(pool.map(lambda h: call(h, method, **params), homes))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def has_torch(pid: int) -> bool:
    return "torch" in Path(f"/proc/{pid}/maps").read_text()


def footprint(pids: list[int], idle_s: float) -> None:
    rss = [rss_mb(p) for p in pids]
    torch = sum(1 for p in pids if has_torch(p))
    before = sum(cpu_s(p) for p in pids)
    t0 = time.monotonic()
    time.sleep(idle_s)  # a measurement window, not a wait for a condition
    used = sum(cpu_s(p) for p in pids) - before
    wall = time.monotonic() - t0
    print(
        f"footprint: RSS per node median {statistics.median(rss):.0f} MB, max {max(rss):.0f} MB, total "
        f"{sum(rss) / 1024:.2f} GB; {torch} node(s) mapped torch; idle CPU of all {len(pids)} nodes "
        f"{100 * used / wall:.1f}% of one core ({1000 * used / wall / len(pids):.1f} ms/s per node) "
        f"over {wall:.0f} s; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def settle_start(pids: list[int], limit: float) -> None:
    """Measure the nodes' CPU in 5 s windows until it stops falling (a window above 90% of
    the previous one, while the machine is not saturated) or ``limit`` seconds pass: a fresh
    devnet spends its first minutes on start-up work (on 20 nodes measured: 24 ms/s per node
    70 s after start, 12 ms/s 30 s later)."""
    t0 = time.monotonic()
    previous = float("inf")
    while time.monotonic() - t0 < limit:
        before = sum(cpu_s(p) for p in pids)
        time.sleep(5.0)  # a measurement window, not a wait for a condition
        used = (sum(cpu_s(p) for p in pids) - before) / 5.0
        if used > 0.9 * previous and used < 0.8 * (os.cpu_count() or 1):  # saturated: cannot show a fall
            break
        previous = used
    print(f"start-up settled after {time.monotonic() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1000, help="votes in the burst (0: no burst)")
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--burst-wait", type=float, default=30.0, help="gossip window: seconds before the first count")
    ap.add_argument("--settle", type=float, default=120.0, help="seconds more for anti-entropy before the last count")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle CPU measurement")
    ap.add_argument(
        "--settle-start",
        type=float,
        default=120.0,
        help="at most this many seconds for start-up work (kad refreshes, mesh building) to "
        "die down before the trials: until the nodes' CPU over 5 s stops falling",
    )
    ap.add_argument("--wave", type=int, default=10, help="nodes started together")
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    args = ap.parse_args()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    alarm = threading.Timer(args.deadline, lambda: os.kill(os.getpid(), signal.SIGTERM))
    alarm.daemon = True
    alarm.start()
    with (
        tempfile.TemporaryDirectory(prefix="prsm-bb-") as tmp,
        Devnet(Path(tmp) / "dn", args.nodes, args.wave, stake=STAKE) as dn,
    ):
        # Not a `with`: its exit would wait for control calls in flight before the nodes stop.
        pool = ThreadPoolExecutor(max_workers=min(64, 2 * args.nodes))
        try:
            run(pool, dn, args)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    alarm.cancel()


def run(pool: ThreadPoolExecutor, dn: Devnet, args: argparse.Namespace) -> None:
    homes = dn.homes
    n = len(homes)
    started = time.monotonic()
    each(pool, homes, "breaker.wait_mesh", peers=3, timeout=300.0)  # D_low
    print(f"meshed in {time.monotonic() - started:.1f} s (stakes from genesis)", flush=True)
    if args.settle_start > 0:
        settle_start(dn.pids, args.settle_start)
    footprint(dn.pids, args.idle_s)

    need = math.ceil(n / 3)  # equal stakes: ceil(N/3) voters reach 1/3
    counted = 0
    latencies: list[float] = []
    for t in range(args.trials):
        model = model_id(f"trial-{t}")
        voters = [(t * need + i) % n for i in range(need)]
        list(
            pool.map(
                lambda v, m=model: call(homes[v], "breaker.vote", model=m, action="halt", reason="bench: under"),
                voters[:-1],
            )
        )
        counted += need - 1
        each(pool, homes, "breaker.wait_votes", count=counted, timeout=120.0)
        final = call(homes[voters[-1]], "breaker.vote", model=model, action="halt", reason="bench: quorum")
        counted += 1
        states = each(pool, homes, "breaker.wait_state", model=model, state="halted", timeout=120.0)
        since = [s["halted_since_ms"] for s in states]
        latencies.append((max(since) - final["timestamp_ms"]) / 1000)
        slow = since.index(max(since))
        print(
            f"trial {t + 1:>2}: halted on all {n} nodes {latencies[-1] * 1000:.0f} ms after the quorum vote "
            f"(median node {(statistics.median(since) - final['timestamp_ms']):.0f} ms; last: node{slow})",
            flush=True,
        )
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
    print(
        f"halt latency to every node: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)} trials (target p99 < 2000 ms)",
        flush=True,
    )
    if args.burst:
        burst(pool, dn, args, counted)


def burst(pool: ThreadPoolExecutor, dn: Devnet, args: argparse.Namespace, counted: int) -> None:
    homes = dn.homes
    n = len(homes)
    before = each(pool, homes, "breaker.status")
    recorded_before = call(homes[0], "breaker.wait_recorded", count=0, timeout=10.0)["recorded"]
    per_node = args.burst // n
    if per_node > args.models:
        raise SystemExit(f"--burst {args.burst} over {n} nodes is {per_node} votes each: more than --models")
    total = per_node * n
    models = [model_id(f"burst-{m}") for m in range(args.models)]

    def cast(i: int) -> None:
        with ControlClient(Path(homes[i]) / "control.sock", timeout=60) as client:
            for j in range(per_node):
                model = models[(i * per_node + j) % len(models)]
                client.call("breaker.vote", {"model": model, "action": "halt", "reason": "bench: burst"})

    t0 = time.monotonic()
    list(pool.map(cast, range(n)))
    cast_s = time.monotonic() - t0
    target = counted + total
    done_at: list[float] = [0.0] * n

    def counted_by(i: int, until: float) -> int:
        """Votes node i counts once it has them all or at ``until`` (seconds after t0)."""
        left = until - (time.monotonic() - t0)
        if left > 0:
            try:
                votes = int(call(homes[i], "breaker.wait_votes", count=target, timeout=left)["votes"])
                done_at[i] = done_at[i] or time.monotonic() - t0
                return votes
            except Exception:  # a timeout: report how many it has
                pass
        return int(call(homes[i], "breaker.status")["statistics"]["votes"])

    window = list(pool.map(lambda i: counted_by(i, args.burst_wait), range(n)))
    window_ratio = min((g - counted) / total for g in window)
    settle_end = args.burst_wait + args.settle
    got = list(pool.map(lambda i: window[i] if window[i] >= target else counted_by(i, settle_end), range(n)))
    all_s = time.monotonic() - t0
    ratio = min((g - counted) / total for g in got)
    complete = sum(1 for g in got if g >= target)
    after = each(pool, homes, "breaker.status")

    def delta(key: str) -> int:
        return sum(a["statistics"][key] - b["statistics"][key] for a, b in zip(after, before, strict=True))

    def counter_delta(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for a, b in zip(after, before, strict=True):
            for code, c in a["statistics"].get(key, {}).items():
                out[code] = out.get(code, 0) + c - b["statistics"].get(key, {}).get(code, 0)
        return {k: v for k, v in out.items() if v}

    rejected = counter_delta("rejected")
    # Both counts are taken at a time after the first vote was cast (t0); a cast slower than
    # the gossip window is counted when it ends.
    first = max(args.burst_wait, cast_s)
    print(
        f"burst: {total} votes on {len(models)} models cast in {cast_s:.1f} s; delivery ratio (worst node) "
        f"{window_ratio * 100:.2f}% {first:.0f} s after the first vote "
        f"({sum(1 for g in window if g >= target)}/{n} nodes complete), {ratio * 100:.2f}% at "
        f"{max(settle_end, first):.0f} s (target 100%); every vote on {complete}/{n} nodes, the last "
        f"{max(done_at):.1f} s after the burst began ({all_s:.1f} s to collect)",
        flush=True,
    )
    print(
        f"  of the {total * (n - 1)} deliveries to other nodes: {delta('repaired')} by anti-entropy, "
        f"{delta('caught_up')} by catch-up, the rest by gossip; {delta('sync_mismatches')} digest "
        f"mismatches in {delta('syncs')} exchanges ({delta('sync_errors')} failed: "
        f"{counter_delta('exchange_failures')}); rejections {rejected}",
        flush=True,
    )
    t1 = time.monotonic()
    try:
        rec = call(homes[0], "breaker.wait_recorded", count=recorded_before + total, timeout=300.0)
        print(
            f"ledger: all {total} burst votes recorded by the validator at height {rec['height']}, "
            f"{time.monotonic() - t0:.1f} s after the burst began",
            flush=True,
        )
    except Exception as exc:  # report and go on: the figures above stand
        print(f"ledger: not every burst vote recorded after {time.monotonic() - t1:.0f} s: {exc}", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
