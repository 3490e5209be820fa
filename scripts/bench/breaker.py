"""Circuit breaker on N real daemon processes (a devnet on 127.0.0.1, one machine).

- **halt latency**: every node stakes the same amount; for each trial a fresh model gets
  ceil(N/3) - 1 halt votes (under the 1/3 threshold), then one more vote reaches it. The
  latency is from that vote's timestamp (the voter's clock) to the moment the *last* node
  applied the halt (``halted_since_ms`` from ``breaker.wait_state``, each node's clock: all
  on one machine, so one clock). p50/p99 over the trials. Target: p99 < 2 s.
- **burst delivery**: 1,000 votes across 100 models, cast at once from every node (N x
  1000/N distinct voter/model pairs); the delivery ratio is the smallest fraction of them any
  node ends up counting, within the wait. Target: 100%.

    python scripts/bench/breaker.py [--nodes 50] [--trials 20] [--burst 1000] [--models 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prsm_node.control.client import ControlClient

CLI = [sys.executable, "-m", "prsm_node"]


def call(home: str, method: str, **params: Any) -> Any:
    """One control call; ``timeout`` in params is also the daemon-side wait."""
    wait = float(params.get("timeout", 30.0))
    with ControlClient(Path(home) / "control.sock", timeout=wait + 30) as client:
        return client.call(method, params)


def model_id(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def start_devnet(directory: Path, nodes: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [*CLI, "devnet", "--nodes", str(nodes), "--dir", str(directory), "--json", "--ready-timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(660)
    if not out or not out[0]:
        proc.kill()
        raise SystemExit(f"devnet did not start: {proc.stderr.read() if proc.stderr else ''}")
    info = json.loads(out[0])
    print(f"devnet of {nodes} ready in {info['ready_s']} s", flush=True)
    return proc, [n["home"] for n in info["nodes"]]


def each(pool: ThreadPoolExecutor, homes: list[str], method: str, **params: Any) -> list[Any]:
    return list(pool.map(lambda h: call(h, method, **params), homes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--models", type=int, default=100)
    args = ap.parse_args()
    n = args.nodes
    with tempfile.TemporaryDirectory(prefix="prsm-bb-") as tmp:
        proc, homes = start_devnet(Path(tmp) / "dn", n)
        try:
            with ThreadPoolExecutor(max_workers=min(64, 2 * n)) as pool:
                run(pool, homes, args)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(pool: ThreadPoolExecutor, homes: list[str], args: argparse.Namespace) -> None:
    n = len(homes)
    started = time.monotonic()
    staked = each(pool, homes, "ledger.stake", amount="100", timeout=300.0)
    height = max(s["height"] for s in staked)
    each(pool, homes, "ledger.wait_height", height=height, timeout=300.0)
    each(pool, homes, "breaker.wait_mesh", peers=1, timeout=300.0)
    print(f"staked and meshed in {time.monotonic() - started:.1f} s (height {height})", flush=True)

    need = math.ceil(n / 3)  # equal stakes: ceil(N/3) voters reach 1/3
    counted = 0
    latencies: list[float] = []
    for t in range(args.trials):
        model = model_id(f"trial-{t}")
        voters = [(t * need + i) % n for i in range(need)]
        for v in voters[:-1]:
            call(homes[v], "breaker.vote", model=model, action="halt", reason="bench: under")
        counted += need - 1
        each(pool, homes, "breaker.wait_votes", count=counted, timeout=120.0)
        final = call(homes[voters[-1]], "breaker.vote", model=model, action="halt", reason="bench: quorum")
        counted += 1
        states = each(pool, homes, "breaker.wait_state", model=model, state="halted", timeout=120.0)
        last = max(s["halted_since_ms"] for s in states)
        latencies.append((last - final["timestamp_ms"]) / 1000)
        print(f"trial {t + 1:>2}: halted on all {n} nodes {latencies[-1] * 1000:.0f} ms after the quorum vote",
              flush=True)
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
    print(f"halt latency to every node: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)} trials (target p99 < 2000 ms)", flush=True)

    # Burst: N x (burst / N) distinct (voter, model) pairs, all at once.
    per_node = args.burst // n
    burst = per_node * n
    models = [model_id(f"burst-{m}") for m in range(args.models)]
    jobs = [(i, models[(i * per_node + j) % len(models)]) for i in range(n) for j in range(per_node)]
    t0 = time.monotonic()
    list(pool.map(lambda job: call(homes[job[0]], "breaker.vote", model=job[1], action="halt", reason="bench: burst"),
                  jobs))
    cast_s = time.monotonic() - t0
    target = counted + burst
    deadline = 120.0

    def counted_on(home: str) -> int:
        try:
            return int(call(home, "breaker.wait_votes", count=target, timeout=deadline)["votes"])
        except Exception:  # a timeout: report how many it has
            return int(call(home, "breaker.status")["statistics"]["votes"])

    got = list(pool.map(counted_on, homes))
    all_s = time.monotonic() - t0
    ratio = min((g - counted) / burst for g in got)
    complete = sum(1 for g in got if g >= target)
    print(f"burst: {burst} votes on {len(models)} models cast in {cast_s:.1f} s; every vote on {complete}/{n} "
          f"nodes after {all_s:.1f} s; delivery ratio (worst node) {ratio * 100:.2f}% (target 100%)", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
