"""NWTN agents under load, on a devnet of real daemon processes (127.0.0.1, one machine).

1. **Queries.** The Opticks embedder (``--query-model``; or the classifier) is trained here,
   published by the first executor node and fetched by the others; the asker nodes (the first
   ``--askers``, half the devnet by default: the queries come from across the network, as a
   network's users do, not all through one node) host nothing. Then ``--queries`` simple
   queries go to the askers' control sockets (``agents.ask``, round robin), ``--concurrency``
   of them in flight at once (all of them at once by default). A simple query is one the
   pipeline answers with one subtask: only that model is on the network, so the architect's
   other steps have no model and are skipped,
   and the retrieval (the query and 15 corpus passages embedded) runs on another peer over
   ``/prsm/task/1.0.0``: routed, admitted, run, charged, paid with signed receipts (settled in
   batches through the ledger meanwhile). The asker keeps the passages' vectors it was paid for
   (per model id, ``nwtn/cache.py``), so a query sends the query and the passages it has not seen
   yet (the first queries send all 16 texts); concurrent queries' requests for one executor go
   out together as one batched task. The warm-up (not measured) loads the model on every
   executor. The askers' batching, cache and registry figures and each daemon's CPU are printed.
   Latency is from the moment a query is sent to its answer; throughput is answered queries
   over the wall time of the whole load. Target: p95 under 2 s.
2. **Executor vs bare torch.** In this process, on the same torch thread count: the runtime's
   batched path under a sustained queue (``ModelRuntime.run`` for ``--exec-per-round`` ×
   ``--exec-batch`` requests at once: parsed, batched ``--exec-batch`` at a time, encoded to
   tensors, one forward pass per batch in a worker thread, outputs decoded and delivered)
   against ``module(batch)`` called directly, back to back, on the tensors one such batch
   becomes, on the runtime's device thread too (the same OS thread: on another thread, which
   core each side got biased whole runs by -2 to +9%). Items per second: medians over
   interleaved rounds; the ratio is the median of the rounds' own ratios, with their
   quartiles beside it (a round is
   ~75 ms a side, and a 2-core machine shared with other work moves single rounds' ratios by
   ±15% or more: the 100 rounds keep the median's own spread near ±2%, where 30 left it near
   ±4%). Target: the executor at least 90% of bare.

    python scripts/bench/agents.py [--queries 1000] [--concurrency 0] [--nodes 4] [--askers 2]
                                   [--exec-model embedder] [--exec-batch 16] [--quick]

Every process started here (the devnet launcher and its daemons) is stopped at the end, on
error too. The whole run is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from prsm_node.control.client import call  # noqa: E402
from prsm_node.control.server import MAX_CONNECTIONS  # noqa: E402

CLI = [sys.executable, "-m", "prsm_node"]
QUERY_WORDS = ("Light", "Colours", "Refraction", "thin Plates", "Rays", "Prism", "Reflexion", "Bodies")


def log(msg: str) -> None:
    print(msg, flush=True)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


# ------------------------------------------------------------ the devnet


class Devnet:
    """``prsm-node devnet`` in a process of its own; ``stop()`` ends it and every daemon."""

    def __init__(self, directory: Path, nodes: int, ready_timeout: float, torch_threads: int) -> None:
        env = dict(os.environ)
        if torch_threads:  # torch's intra-op threads in every daemon (OpenMP reads this at start)
            env["OMP_NUM_THREADS"] = str(torch_threads)
        self.proc = subprocess.Popen(
            [*CLI, "devnet", "--nodes", str(nodes), "--dir", str(directory), "--json",
             "--ready-timeout", str(ready_timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.nodes: list[dict[str, Any]] = []
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(ready_timeout + 30)
        if not out or not out[0]:
            self.stop()
            raise SystemExit(f"the devnet did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.nodes = json.loads(out[0])["nodes"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the launcher stops every node, then exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for node in self.nodes:  # a launcher killed above leaves its daemons: end them too
            try:
                os.kill(int(node["pid"]), signal.SIGKILL)
            except (ProcessLookupError, KeyError):
                pass
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiled(pids: dict[str, int], folder: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (``pip install py-spy``) sampling each daemon, collapsed stacks into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--format", "raw", "-r", "100",
                              "-p", str(pid), "-o", str(folder / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def control(node: dict[str, Any], method: str, timeout: float = 120, **params: Any) -> Any:
    return call(Path(node["home"]), method, params, timeout=timeout)


def train(models: Path, tiny: bool) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_models.py"), str(models),
                    "--only", "classifier,embedder", *(["--tiny"] if tiny else [])],
                   check=True, stdout=subprocess.DEVNULL, timeout=600)


def publish(nodes: list[dict[str, Any]], models: Path, name: str) -> str:
    """Publish ``name`` on the first node; every other node fetches it."""
    doc = json.loads((models / name / "spec.json").read_text())
    mid = str(control(nodes[0], "model.publish", path=str(models / name), name=name, version="1",
                      tags=doc["tags"], metadata={"architecture": doc["architecture"]})["id"])
    for node in nodes[1:]:
        control(node, "model.fetch", ref=mid, timeout=300)
    return mid


WARM_ROUNDS = 8


def warm_up(askers: list[dict[str, Any]], executors: list[dict[str, Any]]) -> None:
    """Fill the askers' routers and load the model on every executor before the measured load
    (a load is seconds of torch import and reading weights, which would otherwise land inside
    the measurement on whichever executor gets its first task then). Asks go out a few at a
    time, concurrently: one after another they would all be routed to the same executor."""
    from concurrent.futures import ThreadPoolExecutor

    def ask_once(node: dict[str, Any]) -> None:
        control(node, "agents.ask", query="Of the Colours of Light", budget="1", timeout=120.0)

    for _ in range(WARM_ROUNDS):
        with ThreadPoolExecutor(max_workers=4 * len(executors)) as pool:
            list(pool.map(ask_once, [a for a in askers for _ in range(4 * len(executors))]))
        if all(control(n, "agents.status")["runtime"]["models"] for n in executors):
            return
    log("warning: the model is not loaded on every executor after the warm-up")


# ------------------------------------------------------------ the query load


IDLE_S = 3.0  # seconds of idle CPU measured before the load
OPEN_PER_ASKER = MAX_CONNECTIONS  # what the control server serves at once; more would only queue there
BACKLOG_WAIT_S = (0.002, 0.2)  # a full listen backlog: first and longest wait before connecting again


SUBTASK = {"embedder": "retrieve", "classifier": "classify"}


class _Query:
    __slots__ = ("asker", "request", "t0", "sock", "buf")

    def __init__(self, asker: int, request: bytes) -> None:
        self.asker, self.request = asker, request
        self.t0 = 0.0
        self.sock: socket.socket | None = None
        self.buf = bytearray()


def run_load(askers: list[dict[str, Any]], queries: int, concurrency: int, deadline: float,
             subtask: str = "retrieve") -> tuple[list[float], dict[str, int], float, list[dict[str, Any]]]:
    """Send ``queries`` asks round robin to the askers' control sockets, ``concurrency`` in
    flight at once, from one epoll loop over non-blocking Unix sockets (the load generator
    shares the machine with the daemons it measures: a trio client of the same requests took
    ~0.9 ms of CPU per query, which the daemons then lacked). A query's latency runs from the
    moment it is let in (waiting for a connection counts) to its reply line."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: list[dict[str, Any]] = []

    def fail(key: str) -> None:
        errors[key] = errors.get(key, 0) + 1

    def request(i: int) -> bytes:
        query = f"Of the {QUERY_WORDS[i % len(QUERY_WORDS)]} and the Colours of Bodies, question {i}"
        params = {"query": query, "budget": "1", "timeout": deadline}
        return json.dumps({"id": i, "method": "agents.ask", "params": params}).encode() + b"\n"

    def answered(q: _Query, line: bytes) -> None:
        reply = json.loads(line)
        if "error" in reply:
            fail(reply["error"].get("code", "error"))
            return
        step = next(r for r in reply["result"]["trace"] if r["subtask"] == subtask)
        if step["error"] is not None:
            fail(f"{subtask}: " + "/".join(sorted({str(a["error"]) for a in step["attempts"]}) or {"none"}))
            return
        latencies.append(time.monotonic() - q.t0)
        if len(samples) < 3:
            samples.append(step)

    pending = deque(_Query(i % len(askers), request(i)) for i in range(queries))  # not let in yet
    waiting: list[deque[_Query]] = [deque() for _ in askers]  # let in, not connected yet
    admitted = 0  # let in and not finished
    paths = [n["control"] for n in askers]
    open_per = [0] * len(askers)
    blocked_until = [0.0] * len(askers)  # a full backlog: no connect to that asker before then
    backoff = [BACKLOG_WAIT_S[0]] * len(askers)
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    end = started + deadline

    def close(q: _Query) -> None:
        nonlocal admitted
        assert q.sock is not None
        sel.unregister(q.sock)
        q.sock.close()
        admitted -= 1
        open_per[q.asker] -= 1

    def start(a: int, now: float) -> bool:
        """Connect and send the next query for asker ``a``; False while its backlog is full."""
        nonlocal admitted
        q = waiting[a][0]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(paths[a])
        if err == errno.EAGAIN:  # the listen backlog is full: the daemon has not accepted enough yet
            sock.close()
            blocked_until[a], backoff[a] = now + backoff[a], min(BACKLOG_WAIT_S[1], backoff[a] * 2)
            return False
        waiting[a].popleft()
        backoff[a] = BACKLOG_WAIT_S[0]
        try:
            if err:
                raise OSError(err, os.strerror(err))
            sent = sock.send(q.request)  # a few hundred bytes into an empty socket buffer
        except OSError as exc:
            sock.close()
            admitted -= 1
            fail(type(exc).__name__)
            return True
        if sent != len(q.request):
            raise AssertionError(f"short send of a {len(q.request)}-byte request")
        q.sock = sock
        sel.register(sock, selectors.EVENT_READ, q)
        open_per[a] += 1
        return True

    while len(latencies) + sum(errors.values()) < queries:
        now = time.monotonic()
        if now >= end:
            break
        while pending and admitted < concurrency:
            q = pending.popleft()
            q.t0 = now
            waiting[q.asker].append(q)
            admitted += 1
        for a in range(len(askers)):
            while (waiting[a] and open_per[a] < OPEN_PER_ASKER
                   and blocked_until[a] <= now and start(a, now)):
                pass
        timeout = end - now
        blocked = [b for a, b in enumerate(blocked_until) if waiting[a] and b > now]
        if blocked:
            timeout = min(timeout, min(blocked) - now)
        for key, _ in sel.select(max(0.0, timeout)):
            q = key.data
            try:
                chunk = q.sock.recv(1 << 16)
            except OSError as exc:
                close(q)
                fail(type(exc).__name__)
                continue
            if not chunk:
                close(q)
                fail("the daemon closed the control socket")
                continue
            q.buf += chunk
            if q.buf.endswith(b"\n"):
                close(q)
                answered(q, bytes(q.buf))
    wall = time.monotonic() - started
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    unanswered = queries - len(latencies) - sum(errors.values())
    if unanswered:
        errors["not answered in time"] = unanswered
    return latencies, errors, wall, samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


# ------------------------------------------------------------ executor vs bare torch


def texts_for(n: int) -> list[str]:
    return [f"Of the Colours of thin transparent Plates, and the Rings they show, observation {i}" for i in range(n)]


async def executor_vs_bare(models: Path, name: str, batch: int, rounds: int, per_round: int,
                           threads: int) -> dict[str, Any]:
    """Items per second of the runtime's batched path and of ``module(batch)`` on the same
    tensors, interleaved, ``rounds`` × ``per_round`` batches each; medians of the rounds.

    The executor runs in two request shapes: ``whole`` (one request carrying the batch's
    ``batch`` items, as the retrieval subtask sends its 16 texts; embedder only) and ``single``
    (``batch`` requests of one item each, batched together by the runtime)."""
    from prsm_node.agents.runtime import RuntimeConfig, open_runtime

    doc = json.loads((models / name / "spec.json").read_text())
    config = RuntimeConfig(device="cpu", memory_limit_bytes=1 << 30, max_batch_size=batch, max_batch_wait_s=0.0,
                           torch_threads=threads)
    async with open_runtime(config) as runtime:
        await runtime.load(name, doc["architecture"], models / name)
        model = runtime._models[name]  # the loaded module itself, for the bare forward pass
        module, spec = model.module, model.spec
        texts = texts_for(batch)
        singles, bare = _bare_call(module, spec, texts)
        shapes = {"single": singles}
        if "texts" in singles[0]:
            shapes = {"whole": [{"texts": texts}], **shapes}
        import torch

        async def executor_batches(requests: list[dict[str, Any]], n: int) -> None:
            """``n`` batches' worth of requests at once: a sustained queue, batched by the runtime."""
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    for item in requests:
                        nursery.start_soon(runtime.run, name, item)

        def bare_batches() -> float:
            torch.set_num_threads(threads)  # OpenMP's count is per thread: the same as the runtime's
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(per_round):
                    bare()
            return time.perf_counter() - t0

        for _ in range(3):  # warm up every path
            for requests in shapes.values():
                await executor_batches(requests, 2)
            await runtime._device_thread.run(bare_batches)
        before = runtime.statistics().batches
        times: dict[str, list[float]] = {"bare": [], **{k: [] for k in shapes}}
        order = list(times)
        for r in range(rounds):
            for which in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                if which == "bare":
                    times["bare"].append(await runtime._device_thread.run(bare_batches))  # the same thread
                else:
                    t0 = time.perf_counter()
                    await executor_batches(shapes[which], per_round)
                    times[which].append(time.perf_counter() - t0)
        batches = runtime.statistics().batches - before
        device = runtime.device
        torch_threads = torch.get_num_threads()
    rate = {k: batch * per_round / statistics.median(v) for k, v in times.items()}
    # the ratio is the median of each round's own ratio: rounds are adjacent in time, so a
    # machine whose load drifts (other processes) moves both sides of a round together
    ratios = {k: sorted(b / e for b, e in zip(times["bare"], times[k], strict=True)) for k in shapes}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    main = "whole" if "whole" in rate else "single"
    quartiles = statistics.quantiles(ratios[main], n=4) if rounds > 1 else [ratio[main]] * 3
    return {"model": name, "batch": batch, "device": device, "threads": torch_threads, "bare": rate["bare"],
            "executor": rate[main], "shape": main, "ratio": ratio[main], "rounds": rounds,
            "ratio_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
            "single": rate["single"], "single_ratio": ratio["single"],
            "batches_per_call": batches / (rounds * per_round * len(shapes))}


def _bare_call(module: Any, spec: Any, texts: list[str]) -> tuple[list[dict[str, Any]], Any]:
    """The runtime's inputs for ``texts`` and a call of ``module`` on the tensors they become."""
    import torch

    from prsm_node.agents.architectures import TORCH_DTYPES, classifier_features, pad_batch
    from prsm_node.agents.inputs import ClassifyInput, parse_input
    from prsm_node.agents.specs import ClassifierConfig, EmbedderConfig
    from prsm_node.agents.text import encode_chars

    cfg = spec.config
    cpu = torch.device("cpu")
    if isinstance(cfg, EmbedderConfig):
        rows = [encode_chars(cfg.shape.vocab, t[: cfg.shape.context]) for t in texts]
        ids, valid = pad_batch(rows, left=False, device=cpu)
        return [{"texts": [t]} for t in texts], lambda: module(ids, valid)
    assert isinstance(cfg, ClassifierConfig)
    items = [parse_input(spec, {"text": t}) for t in texts]
    x, _ = classifier_features(cfg, [i for i in items if isinstance(i, ClassifyInput)])
    x = x.to(dtype=TORCH_DTYPES[cfg.dtype])
    return [{"text": t} for t in texts], lambda: module(x)


# ------------------------------------------------------------ main


def _too_long(signum: int, frame: object) -> None:
    raise TimeoutError("the bench ran past --timeout")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=0, help="queries in flight at once (0: all of them)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--askers", type=int, help="nodes that ask (and host nothing); default: half of --nodes")
    ap.add_argument("--tiny", action="store_true", help="tiny models (seconds of training)")
    ap.add_argument("--query-model", choices=("embedder", "classifier"), default="embedder")
    ap.add_argument("--exec-model", choices=("embedder", "classifier"), help="default: the query model")
    ap.add_argument("--exec-batch", type=int, default=16)
    ap.add_argument("--exec-rounds", type=int, default=100)
    ap.add_argument("--exec-per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the executor comparison")
    ap.add_argument("--daemon-threads", type=int, default=1,
                    help="torch threads in each daemon (OMP_NUM_THREADS; 0: torch's default, one per core)")
    ap.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run, seconds")
    ap.add_argument("--quick", action="store_true", help="100 queries, tiny models, a short comparison")
    ap.add_argument("--exec-only", action="store_true", help="only the executor vs bare torch comparison")
    ap.add_argument("--models", type=Path, help="trained models to use (trained here into it when missing)")
    ap.add_argument("--keep", type=Path, help="put the devnet (homes, logs) here and keep it")
    ap.add_argument("--profile", type=Path,
                    help="py-spy the first asker and the first executor during the load, into DIR")
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.tiny, args.exec_rounds, args.exec_per_round = min(args.queries, 100), True, 6, 5
    if args.askers is None:
        args.askers = args.nodes // 2
    if not 2 <= args.nodes <= 16 or not 1 <= args.askers < args.nodes:
        ap.error("--nodes must be 2..16 and --askers 1..nodes-1")
    if not 1 <= args.queries <= 100_000 or args.concurrency < 0:
        ap.error("--queries must be 1..100000 and --concurrency >= 0")
    concurrency = args.concurrency or args.queries
    args.exec_model = args.exec_model or args.query_model
    bound: float = time.monotonic() + args.timeout

    def left() -> float:
        return max(1.0, bound - time.monotonic())

    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(int(args.timeout) + 60)  # a hard stop; the devnet is still stopped by the finally below
    log(f"settings: {args.queries} queries on the {args.query_model}, {concurrency} in flight, {args.nodes} nodes "
        f"({args.askers} asking, {args.nodes - args.askers} executing), {'tiny' if args.tiny else 'full'} models; "
        f"executor vs bare: {args.exec_model}, batch {args.exec_batch}, {args.exec_rounds}x{args.exec_per_round} "
        f"batches each, {args.threads} torch thread(s); daemons: {args.daemon_threads or 'default'} torch thread(s); "
        f"{load_text()}")
    with tempfile.TemporaryDirectory(prefix="prsm-ba-") as tmp:
        models = args.models or Path(tmp) / "models"
        if not all((models / f"opticks-{n}" / "spec.json").is_file() for n in ("classifier", "embedder")):
            t0 = time.monotonic()
            train(models, args.tiny)
            log(f"trained the classifier and the embedder in {time.monotonic() - t0:.1f} s")
        if args.exec_only:
            ex = trio.run(executor_vs_bare, models, "opticks-" + args.exec_model, args.exec_batch, args.exec_rounds,
                          args.exec_per_round, args.threads)
            log(f"executor vs bare torch: {json.dumps(ex)}; {load_text()}")
            return 0
        devnet = Devnet(args.keep or Path(tmp) / "net", args.nodes, ready_timeout=min(300.0, left()),
                        torch_threads=args.daemon_threads)
        try:
            askers, executors = devnet.nodes[: args.askers], devnet.nodes[args.askers:]
            log(f"devnet of {args.nodes} ready; {load_text()}")
            mid = publish(executors, models, "opticks-" + args.query_model)
            log(f"{args.query_model} {mid[:16]} on {len(executors)} executors; warming up")
            warm_up(askers, executors)
            idle_start = [cpu_seconds(int(n["pid"])) for n in devnet.nodes]
            time.sleep(IDLE_S)  # the daemons' own background work (consensus, gossip), to subtract
            load_before = os.getloadavg()
            cpu_before = [cpu_seconds(int(n["pid"])) for n in devnet.nodes]
            idle_rate = [(b - a) / IDLE_S for a, b in zip(idle_start, cpu_before, strict=True)]
            spies = [] if args.profile is None else profiled(
                {"asker": int(askers[0]["pid"]), "executor": int(executors[0]["pid"])}, args.profile)
            client_before = time.process_time()
            latencies, errors, wall, samples = run_load(askers, args.queries, concurrency, min(600.0, left()),
                                                        SUBTASK[args.query_model])
            client_cpu = time.process_time() - client_before
            for spy in spies:  # py-spy writes its file when it is interrupted
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
            cpu = [max(0.0, cpu_seconds(int(n["pid"])) - b - r * wall)
                   for n, b, r in zip(devnet.nodes, cpu_before, idle_rate, strict=True)]
            load_after = os.getloadavg()
            served = [control(n, "agents.status")["tasks"] for n in executors]
            asking = [control(n, "agents.status") for n in askers]
            log("askers: " + "; ".join(
                f"{a['tasks']['batches_sent']} batches of {a['tasks']['batched_requests']} requests, "
                f"router refreshed {a['router']['refreshes']} times, embedding cache {a['embedding_cache']}"
                for a in asking))
            log(f"asker's registry: {asking[0]['router']['candidates']}")
            log("CPU s per daemon during the load: " + " ".join(f"{c:.2f}" for c in cpu)
                + f"; this bench's client: {client_cpu:.2f}")
        finally:
            devnet.stop()
        log("devnet stopped; executor vs bare torch ...")
        name = "opticks-" + args.exec_model
        ex = trio.run(executor_vs_bare, models, name, args.exec_batch, args.exec_rounds, args.exec_per_round,
                      args.threads)
        load_exec = os.getloadavg()
    signal.alarm(0)
    report(args, concurrency, latencies, errors, wall, samples, served, cpu, load_before, load_after, ex, load_exec)
    return 0


def report(args: argparse.Namespace, concurrency: int, latencies: list[float], errors: dict[str, int], wall: float,
           samples: list[dict[str, Any]], served: list[dict[str, Any]], cpu: list[float],
           load_before: tuple[float, ...],
           load_after: tuple[float, ...], ex: dict[str, Any], load_exec: tuple[float, ...]) -> None:
    ok = len(latencies)
    rows: list[tuple[str, str, str]] = [("queries answered", f"{ok} / {args.queries}", "")]
    if errors:
        rows.append(("failed", str(sum(errors.values())), ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))))
    if latencies:
        p95 = percentile(latencies, 0.95)
        rows += [
            ("latency p50", f"{percentile(latencies, 0.50) * 1000:.0f} ms", ""),
            ("latency p95", f"{p95 * 1000:.0f} ms", "target < 2000 ms: " + ("met" if p95 < 2 else "MISSED")),
            ("latency p99 / max", f"{percentile(latencies, 0.99) * 1000:.0f} / {max(latencies) * 1000:.0f} ms", ""),
            ("throughput", f"{ok / wall:.1f} queries/s", f"{ok} answered in {wall:.1f} s"),
        ]
    if ok:
        asking, executing = sum(cpu[: args.askers]), sum(cpu[args.askers:])
        rows.append(("CPU per answered query", f"{(asking + executing) / ok * 1000:.1f} ms",
                     f"askers {asking / ok * 1000:.1f} ms, executors {executing / ok * 1000:.1f} ms "
                     f"(every daemon's CPU time less its idle rate)"))
    rows.append(("tasks served per executor", " ".join(str(s["tasks_served"]) for s in served),
                 "refused: " + json.dumps([s["tasks_refused"] for s in served])))
    rows.append(("machine load (1/5/15 min)", " ".join(f"{x:.2f}" for x in load_after),
                 f"before the load {load_before[0]:.2f}; {os.cpu_count()} CPUs"))
    verdict = "met" if ex["ratio"] >= 0.9 else "MISSED"
    rows += [
        (f"bare torch ({ex['model']}, batch {ex['batch']})", f"{ex['bare']:.0f} items/s",
         f"{ex['device']}, {ex['threads']} thread(s)"),
        (f"executor (ModelRuntime.run), {ex['shape']}", f"{ex['executor']:.0f} items/s",
         f"{ex['batches_per_call']:.2f} forward passes per batch of items"),
        ("executor / bare", f"{ex['ratio'] * 100:.1f} %",
         f"target >= 90%: {verdict} (median of {ex['rounds']} rounds' ratios; their quartiles "
         f"{ex['ratio_quartiles'][0] * 100:.1f}-{ex['ratio_quartiles'][1] * 100:.1f} %)"),
        ("executor, one request per item", f"{ex['single']:.0f} items/s",
         f"{ex['single_ratio'] * 100:.1f} % of bare torch"),
        ("machine load during the comparison", " ".join(f"{x:.2f}" for x in load_exec), ""),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    log("")
    log(f"NWTN agents: {args.queries} simple queries ({SUBTASK[args.query_model]} on the {args.query_model}), "
        f"{concurrency} in flight, {args.nodes}-node devnet")
    log("-" * (width + vwidth + 40))
    for label, value, note in rows:
        log(f"{label:<{width}}  {value:>{vwidth}}  {note}")
    if samples:
        s = samples[0]
        log(f"\na sample trace row: {s['subtask']} on {s['model']} at {s['peer'][:16]}… {s['ms']} ms, "
            f"{s['units']} units, {s['cost_ftns']} FTNS")


if __name__ == "__main__":
    sys.exit(main())
