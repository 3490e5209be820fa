"""Discovery benchmark: N real prsm-node daemons on 127.0.0.1 (default 50).

Prints:
  * seconds from launch until every daemon answers on its control socket (ready),
  * seconds from launch until every daemon's routing table is full (min(N-1, k) peers),
  * seconds from launch until every node has resolved every other node (all N*(N-1) pairs),
  * DHT lookup latency p50/p99 over random forced lookups (iterative FIND_NODE, not a cache
    hit), against a baseline measured in the same run: one control-socket round trip,
  * RSS and PSS per idle daemon (forked daemons share pages, so PSS is the fair share).

Targets (issue 2): 50 nodes fully discoverable within 60 s of launch on a 2-core machine,
lookup p99 under 200 ms, under 150 MB RSS per idle node.

    python scripts/bench/discovery.py [--nodes 50] [--lookups 500] [--idle 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prsm_node.control.client import ControlClient
from prsm_node.exceptions import DaemonNotRunning


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_answering(control: Path, deadline: float) -> float:
    """Seconds (monotonic) at which the daemon first answered `id`."""
    while time.monotonic() < deadline:
        try:
            with ControlClient(control, timeout=10) as c:
                c.call("id")
            return time.monotonic()
        except DaemonNotRunning:
            time.sleep(0.02)  # a benchmark probe, not a test: the socket does not exist yet
    raise TimeoutError(f"{control} never answered")


def memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except FileNotFoundError:
        pss = rss
    return rss, pss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds idle before measuring memory")
    ap.add_argument("--workers", type=int, default=8, help="concurrent control-socket clients")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = ap.parse_args()
    rng = random.Random(2)
    workdir = Path(tempfile.mkdtemp(prefix="prsm-bench-"))
    n = args.nodes
    print(f"discovery benchmark: {n} daemons on 127.0.0.1, {os.cpu_count()} cores, dir {workdir}", flush=True)

    launched = time.monotonic()
    deadline = launched + args.timeout
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prsm_node",
            "devnet",
            "--nodes",
            str(n),
            "--dir",
            str(workdir / "dn"),
            "--json",
            "--ready-timeout",
            str(args.timeout),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # every daemon's control socket answering = ready
        homes = [workdir / "dn" / f"node{i}" for i in range(n)]
        while not all((h / "config.toml").exists() for h in homes):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("devnet did not create its homes")
            time.sleep(0.02)
        with ThreadPoolExecutor(args.workers) as pool:
            answered = list(pool.map(lambda h: wait_answering(h / "control.sock", deadline), homes))
        t_ready = max(answered) - launched
        print(f"  all {n} daemons answering ............ {t_ready:6.1f} s after launch", flush=True)

        info_line: list[str] = []
        reader = threading.Thread(target=lambda: info_line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not info_line or not info_line[0]:
            raise RuntimeError("devnet did not report ready")
        info = json.loads(info_line[0])
        t_tables = time.monotonic() - launched
        print(
            f"  all routing tables full ............. {t_tables:6.1f} s after launch "
            f"(devnet launcher: {info['ready_s']} s)",
            flush=True,
        )
        nodes = info["nodes"]

        # every node resolves every other node
        pairs = [(a, b) for a in nodes for b in nodes if a is not b]

        by_node: dict[str, list[tuple[dict, dict]]] = {}
        for a, b in pairs:
            by_node.setdefault(a["control"], []).append((a, b))

        def resolve_all_from(items: list[tuple[dict, dict]]) -> list[float]:
            a = items[0][0]
            out = []
            with ControlClient(Path(a["control"]), timeout=30) as c:
                for _, b in items:
                    r = c.call("find_peer", {"peer_id": b["peer_id"]})
                    assert b["addr"].split("/p2p/")[0] in r["addrs"], r
                    out.append(float(r["ms"]))
            return out

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(resolve_all_from, by_node.values()))
        t_all = time.monotonic() - launched
        print(f"  every node resolved every other ..... {t_all:6.1f} s after launch ({len(pairs)} pairs)", flush=True)

        # forced DHT lookups (iterative FIND_NODE over the network)
        sample = [rng.choice(pairs) for _ in range(args.lookups)]

        def forced_lookup(pair: tuple[dict, dict]) -> tuple[float, int]:
            a, b = pair
            with ControlClient(Path(a["control"]), timeout=30) as c:
                r = c.call("find_peer", {"peer_id": b["peer_id"], "lookup": True})
            return float(r["ms"]), int(r["queried"])

        with ThreadPoolExecutor(1) as pool:  # one at a time: latency, not throughput
            results = list(pool.map(forced_lookup, sample))
        lat = [ms for ms, _ in results]
        asked = [q for _, q in results]
        base = []
        with ControlClient(Path(nodes[0]["control"]), timeout=10) as c:
            for _ in range(200):
                t0 = time.perf_counter()
                c.call("id")
                base.append((time.perf_counter() - t0) * 1000)
        b50 = statistics.median(base)
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        print(
            f"  DHT lookup latency ({len(lat)} forced) .. p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
            f"max {max(lat):6.1f} ms  peers asked mean {statistics.mean(asked):.1f}",
            flush=True,
        )
        print(
            f"  baseline: control round trip ........ p50 {b50:6.2f} ms  "
            f"(lookup p50 = {p50 / b50:.0f}x a local round trip)",
            flush=True,
        )

        time.sleep(args.idle)  # let the daemons go idle before reading memory
        mem = [memory_kb(n_["pid"]) for n_ in nodes]
        rss = [r / 1024 for r, _ in mem]
        pss = [p / 1024 for _, p in mem]
        print(
            f"  memory per idle daemon .............. RSS mean {statistics.mean(rss):6.1f} MB  "
            f"max {max(rss):6.1f} MB | PSS mean {statistics.mean(pss):6.1f} MB",
            flush=True,
        )
        ok = t_all <= 60 and p99 < 200 and max(rss) < 150
        print(
            json.dumps(
                {
                    "nodes": n,
                    "ready_s": round(t_ready, 2),
                    "tables_full_s": round(t_tables, 2),
                    "all_resolved_s": round(t_all, 2),
                    "lookup_p50_ms": p50,
                    "lookup_p99_ms": p99,
                    "control_rtt_p50_ms": round(b50, 3),
                    "rss_mean_mb": round(statistics.mean(rss), 1),
                    "rss_max_mb": round(max(rss), 1),
                    "pss_mean_mb": round(statistics.mean(pss), 1),
                    "targets_met": ok,
                }
            )
        )
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
