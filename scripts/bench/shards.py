"""Model exchange benchmark: a random safetensors model fetched between real daemons, against
two baselines measured in the same run with the same bytes.

Each run, back to back (so the ratios compare figures taken under the same load):

  * ``bare stream``: the model file's bytes over one py-libp2p stream between two processes
    (Noise + yamux, ``max_connections_per_peer=1``): py-libp2p's ceiling, with the best settings
    we found, the same the daemons use: ``PY_YAMUX_RELEASE_ON_READ=0`` and glibc malloc
    settings (``prsm_node.host``), and 65,507-byte writes (``WRITE_PIECE``: one yamux frame in one Noise message each).
    Measured 256 MiB, 3 runs each, load ~2.5: 1 MiB writes untuned 75-95 MB/s, 1 MiB tuned
    105-123, 65,507 B untuned 86-128, 65,507 B tuned 161-168 MB/s.
  * ``prsm 1 provider``: a devnet of real ``prsm-node`` daemons on 127.0.0.1 (``prsm-node
    devnet``: shared genesis, temp homes); node0 published model ``one``, node4 runs
    ``model.fetch`` (wall time of the control call: manifest, HAVE, every chunk verified and
    written into the model's file, the file checked), then removes it again.
  * ``prsm 4 providers``: node0 published model ``four`` (same size, other bytes) and node1..3
    fetched it before the runs (not timed); node5 fetches it from node0..3 at once.

Then ``bitswap``: py-libp2p's own Bitswap (``libp2p.bitswap``, MerkleDag ``add_bytes`` on one
process, ``fetch_file`` on the other, blocks in memory: no disk at all), ``--runs`` times.

Each transfer also prints how the fetcher's and the providers' main threads (the trio loops)
spent it: running, waiting runnable for a CPU (the 2 cores shared with the other side, worker
threads and other processes), and blocked (idle: waiting on the network, a thread, a timer).
A pipeline stall shows as blocked; CPUs too few for the work as waiting.

MB/s is 10^6 bytes of model per second. Targets (issue 5): 1 provider >= 80 % of the bare
stream, >= 3x Bitswap, 4 providers no slower than 1. The 1-provider and 4-provider ratios are
medians of the per-run ratios.

    python scripts/bench/shards.py [--size-mib 256] [--runs 3] [--skip-bitswap] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
ROLE_TIMEOUT = 900.0


# ------------------------------------------------------------ the model


def make_model(folder: Path, size_mib: int, seed: int = 5) -> Path:
    """One safetensors file of random F32 tensors, 16 MiB each (the last one smaller)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    left = size_mib * MIB
    i = 0
    while left > 0:
        n = min(16 * MIB, left)
        tensors[f"layers.{i}.weight"] = np.frombuffer(rng.bytes(n), dtype=np.float32).reshape(-1, 1024)
        left -= n
        i += 1
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------ baseline processes


def _bare_host(seed: int) -> Any:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from prsm_node.host import tune_malloc, tune_yamux

    tune_yamux()  # the daemons' yamux and malloc settings (prsm_node.host): the baseline gets them too
    tune_malloc()
    key_pair = create_new_key_pair(bytes([seed]) * 32)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                    connection_config=ConnectionConfig(max_connections_per_peer=1))


def role_serve(kind: str, file: Path) -> None:
    """Serve ``file`` (bare stream or Bitswap); print our address, then run until killed."""
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol

    from prsm_node.exchange.service import WRITE_PIECE

    data = file.read_bytes()

    async def main() -> None:
        host = _bare_host(1)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
            extra: dict[str, str] = {}
            if kind == "bare":
                async def handler(stream: Any) -> None:
                    cpu, sched, started = time.process_time(), main_thread_sched(os.getpid()), time.perf_counter()
                    view = memoryview(data)
                    for start in range(0, len(data), WRITE_PIECE):
                        await stream.write(view[start:start + WRITE_PIECE])
                    await stream.close()
                    split = blocked_split(sched, main_thread_sched(os.getpid()), time.perf_counter() - started)
                    print(json.dumps({"cpu": time.process_time() - cpu, "sched": split}), flush=True)

                host.set_stream_handler(TProtocol("/bench/bulk/1.0.0"), handler)
            else:
                from libp2p.bitswap import BitswapClient, cid_to_text
                from libp2p.bitswap.dag import MerkleDag

                bitswap = BitswapClient(host)
                await bitswap.start()
                bitswap.set_nursery(nursery)
                root = await MerkleDag(bitswap).add_bytes(data, chunk_size=256 * 1024)
                extra["root"] = cid_to_text(root)
            print(json.dumps({"addr": f"{host.get_addrs()[0]}", **extra}), flush=True)
            await trio.sleep_forever()

    trio.run(main)


def role_fetch(kind: str, addr: str, root: str, size: int) -> None:
    """Fetch from a ``role_serve`` process; print the bytes and seconds."""
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.peerinfo import info_from_p2p_addr

    async def main() -> None:
        host = _bare_host(2)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            got = 0
            cpu, sched = time.process_time(), main_thread_sched(os.getpid())
            if kind == "bare":
                started = time.perf_counter()
                stream = await host.new_stream(info.peer_id, [TProtocol("/bench/bulk/1.0.0")])
                while True:
                    try:
                        piece = await stream.read(MIB)
                    except StreamEOF:
                        break
                    if not piece:
                        break
                    got += len(piece)
            else:
                from libp2p.bitswap import BitswapClient
                from libp2p.bitswap.dag import MerkleDag

                bitswap = BitswapClient(host)
                await bitswap.start()
                bitswap.set_nursery(nursery)
                started = time.perf_counter()
                data, _ = await MerkleDag(bitswap).fetch_file(root, peer_id=info.peer_id, timeout=120.0)
                got = len(data)
            seconds = time.perf_counter() - started
            split = blocked_split(sched, main_thread_sched(os.getpid()), time.perf_counter() - started)
            print(json.dumps({"bytes": got, "seconds": seconds, "cpu": time.process_time() - cpu, "sched": split}),
                  flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


def baseline(kind: str, file: Path) -> tuple[float, tuple[float, float] | None]:
    """One baseline transfer; returns MB/s and the CPU seconds the fetcher and the server
    spent on it (bare stream only; None for Bitswap). For the bare stream, prints how each
    side's main thread spent the transfer (see ``main_thread_sched``)."""
    me = [sys.executable, __file__]
    server = subprocess.Popen([*me, "--role", f"{kind}-serve", "--file", str(file)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        out = subprocess.run([*me, "--role", f"{kind}-fetch", "--addr", info["addr"], "--root", info.get("root", ""),
                              "--expect", str(file.stat().st_size)], capture_output=True, text=True,
                             timeout=ROLE_TIMEOUT)
        if out.returncode != 0:
            raise RuntimeError(f"{kind} fetch failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if result["bytes"] != file.stat().st_size:
            raise RuntimeError(f"{kind}: got {result['bytes']} of {file.stat().st_size} bytes")
        cpu = None
        if kind == "bare":
            served = json.loads(server.stdout.readline())
            cpu = (result["cpu"], served["cpu"])
            print(f"    bare main threads: fetcher {result['sched']}; server {served['sched']}", flush=True)
        return float(result["bytes"] / result["seconds"] / 1e6), cpu
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


# ------------------------------------------------------------ the devnet


def call(home: str, method: str, params: dict[str, Any], timeout: float = ROLE_TIMEOUT) -> Any:
    from prsm_node.control.client import ControlClient

    with ControlClient(Path(home) / "control.sock", timeout=timeout) as client:
        return client.call(method, params, timeout=timeout)


def timed_fetch(home: str, mid: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = call(home, "model.fetch", {"ref": mid})
    seconds = time.perf_counter() - started
    if result["state"] != "done":
        raise RuntimeError(f"fetch ended {result['state']}: {result['error']}")
    return seconds, result


def profiled(pids: dict[str, int], folder: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (``pip install py-spy``) sampling each daemon, collapsed stacks into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--format", "raw", "-r", "100",
                              "-p", str(pid), "-o", str(folder / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def main_thread_sched(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the trio loop) has run, and has waited runnable for
    a CPU (``/proc/<pid>/task/<pid>/schedstat``; zeros where the kernel keeps no schedstat).
    Over an interval, the rest of the wall time the loop was blocked: idle, waiting on the
    network, a worker thread or a timer. That split tells a stalled pipeline (blocked) from
    CPUs shared with other processes (waiting), which the bench's MB/s alone cannot."""
    try:
        run, wait = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run) / 1e9, int(wait) / 1e9


def blocked_split(before: tuple[float, float], after: tuple[float, float], seconds: float) -> str:
    run, wait = after[0] - before[0], after[1] - before[1]
    return f"run {run:.2f}, waiting for a CPU {wait:.2f}, blocked {max(seconds - run - wait, 0.0):.2f}"


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes have used so far."""
    return sum(_ticks(Path(f"/proc/{pid}/stat")) for pid in pids) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pids: list[int]) -> float:
    """CPU time the processes' main threads (the trio loop: py-libp2p, Noise, yamux) have used."""
    return sum(_ticks(Path(f"/proc/{pid}/task/{pid}/stat")) for pid in pids) / os.sysconf("SC_CLK_TCK")


def page_faults(pids: list[int]) -> int:
    """Minor page faults the processes have taken so far: memory touched fresh (each costs
    far more than its copy on our VMs, see prsm_node/shards/assembly.py)."""
    return sum(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7]) for pid in pids)


def prsm_fetch(label: str, home: str, mid: str, size: int, fetcher: int,
               providers: list[int]) -> tuple[float, float, float]:
    """One timed fetch, printed; returns (end-to-end MB/s, transfer-stage MB/s, CPU seconds of
    the fetcher and the providers). The CPU is also printed per side, and each side's main
    threads (the trio loop) apart from its worker threads (hashing, disk). The model is
    removed from ``home`` afterwards, so the next run fetches it all again."""
    pids = [fetcher, *providers]

    def sample() -> tuple[float, float, float, float, int]:
        return (cpu_seconds([fetcher]), main_thread_cpu([fetcher]), cpu_seconds(providers),
                main_thread_cpu(providers), page_faults(pids))

    before = sample()
    sched = [main_thread_sched(pid) for pid in pids]
    seconds, result = timed_fetch(home, mid)
    f_cpu, f_main, p_cpu, p_main, faults = (b - a for a, b in zip(before, sample(), strict=True))
    splits = [blocked_split(a, main_thread_sched(pid), seconds) for a, pid in zip(sched, pids, strict=True)]
    cpu = f_cpu + p_cpu
    used = [p for p in result["providers"] if p["chunks"]]
    stages = result.get("timings_s") or {}
    transfer = result["bytes_fetched"] / max(stages.get("transfer", result["elapsed_s"]), 1e-9) / 1e6
    print(f"  {label}: {size / seconds / 1e6:.1f} MB/s end to end ({seconds:.2f} s), transfer stage "
          f"{transfer:.1f} MB/s, from {len(used)} providers {[p['chunks'] for p in used]}, stages {stages}, "
          f"{cpu:.2f} CPU s (fetcher {f_cpu:.2f}: main thread {f_main:.2f}; providers {p_cpu:.2f}: main "
          f"threads {p_main:.2f}), {faults} page faults", flush=True)
    print(f"    main threads: fetcher {splits[0]}; " + "; ".join(f"provider {i} {x}" for i, x in enumerate(splits[1:])),
          flush=True)
    call(home, "model.rm", {"id": mid})
    return size / seconds / 1e6, transfer, cpu


def interleaved_runs(args: argparse.Namespace, workdir: Path, one_dir: Path, four_dir: Path,
                     size: int) -> dict[str, list[float]]:
    """Per run, back to back: the bare stream, a 1-provider fetch, a 4-provider fetch; so each
    run's ratios compare figures taken under the same load (other processes share the CPUs).

    Two models of the same size: ``one`` is held by node0 only and fetched by node4; ``four``
    is held by node0..node3 and fetched by node5."""
    proc = subprocess.Popen([sys.executable, "-m", "prsm_node", "devnet", "--nodes", "6", "--dir",
                             str(workdir / "devnet"), "--json", "--ready-timeout", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out: dict[str, list[float]] = {k: [] for k in ("bare stream", "prsm 1 provider", "prsm 4 providers",
                                                   "prsm 1 provider (transfer)", "prsm 4 providers (transfer)",
                                                   "ratio 1 provider / bare", "ratio 4 / 1 providers",
                                                   "CPU s bare stream", "CPU s prsm 1 provider")}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"devnet did not start; see the node.log files under {workdir / 'devnet'}")
        nodes = json.loads(line)["nodes"]
        homes = [n["home"] for n in nodes]
        mids = {}
        for name, folder in (("one", one_dir), ("four", four_dir)):
            started = time.perf_counter()
            pub = call(homes[0], "model.publish", {"path": str(folder), "name": f"bench/{name}", "version": "1"})
            print(f"  published bench/{name}: {pub['chunks']} chunks in {time.perf_counter() - started:.1f} s",
                  flush=True)
            mids[name] = pub["id"]
        for h in homes[1:4]:
            timed_fetch(h, mids["four"])
        for run in range(args.runs):
            print(f"run {run + 1}: load {os.getloadavg()}", flush=True)
            bare, bare_cpu = baseline("bare", one_dir / "model.safetensors")
            assert bare_cpu is not None
            print(f"  bare stream: {bare:.1f} MB/s, {sum(bare_cpu):.2f} CPU s (fetcher {bare_cpu[0]:.2f}, "
                  f"server {bare_cpu[1]:.2f})", flush=True)
            spies = []
            if args.profile is not None and run == 0:
                spies = profiled({"fetcher": nodes[4]["pid"], "provider0": nodes[0]["pid"]},
                                 args.profile / "prsm-1-provider")
            one, one_transfer, one_cpu = prsm_fetch("prsm 1 provider", homes[4], mids["one"], size,
                                                    nodes[4]["pid"], [nodes[0]["pid"]])
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            four, four_transfer, _ = prsm_fetch("prsm 4 providers", homes[5], mids["four"], size,
                                                nodes[5]["pid"], [n["pid"] for n in nodes[:4]])
            print(f"  ratios: 1 provider / bare = {one / bare:.2f}, 4 / 1 providers = {four / one:.2f}", flush=True)
            for k, v in (("bare stream", bare), ("prsm 1 provider", one), ("prsm 4 providers", four),
                         ("prsm 1 provider (transfer)", one_transfer), ("prsm 4 providers (transfer)", four_transfer),
                         ("ratio 1 provider / bare", one / bare), ("ratio 4 / 1 providers", four / one),
                         ("CPU s bare stream", sum(bare_cpu)), ("CPU s prsm 1 provider", one_cpu)):
                out[k].append(v)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-bitswap", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (model, devnet homes, logs)")
    ap.add_argument("--profile", type=Path,
                    help="py-spy the fetcher and the provider during the first 1-provider fetch, into DIR")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        kind, what = args.role.split("-")
        if what == "serve":
            role_serve(kind, Path(args.file))
        else:
            role_fetch(kind, args.addr, args.root, args.expect)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="prsm-bench-shards-"))
    try:
        return run_all(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_all(args: argparse.Namespace, workdir: Path) -> int:
    print(f"load before: {os.getloadavg()}", flush=True)
    one = make_model(workdir / "one", args.size_mib, seed=5)
    make_model(workdir / "four", args.size_mib, seed=6)
    size = one.stat().st_size
    print(f"models: 2 x {size / MIB:.1f} MiB in {workdir}", flush=True)
    results = interleaved_runs(args, workdir, one.parent, workdir / "four", size)
    if not args.skip_bitswap:
        results["bitswap"] = []
        for run in range(args.runs):
            mbps, _ = baseline("bitswap", one)
            print(f"  bitswap run {run + 1}: {mbps:.1f} MB/s (load {os.getloadavg()[0]:.2f})", flush=True)
            results["bitswap"].append(mbps)
    print(f"load after: {os.getloadavg()}")
    med = {k: statistics.median(v) for k, v in results.items() if v}
    print(f"\n{'configuration':<30} {'median':>8}  runs")
    for k, v in results.items():
        if v:
            print(f"{k:<30} {med[k]:>8.2f}  {', '.join(f'{x:.2f}' for x in v)}")
    print(f"\n1 provider / bare stream   = {med['ratio 1 provider / bare']:.2f}  (median of per-run ratios; "
          "target >= 0.80)")
    if "bitswap" in med:
        print(f"1 provider / bitswap       = {med['prsm 1 provider'] / med['bitswap']:.2f}  (medians; target >= 3)")
    print(f"4 providers / 1 provider   = {med['ratio 4 / 1 providers']:.2f}  (median of per-run ratios; target >= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
