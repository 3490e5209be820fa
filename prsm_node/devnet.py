"""``prsm-node devnet``: N real daemon processes on 127.0.0.1 sharing a fresh devnet genesis.

Layout under ``--dir``: ``network/`` (genesis.json, peers.txt: a network folder like those in
bootstrap/, so other nodes can join with ``prsm-node init --network DIR/network``) and one home
per node, ``node0`` … ``nodeN-1``. node0 is the bootstrap peer of the others. The first
``--validators`` nodes are the genesis validators (one: node0 makes blocks alone; four or
more: they run PBFT). ``--test-fault node3=silent`` starts one node with a test fault. Ports are fixed
at creation so a restarted node keeps its address. Re-running on the same dir reuses the homes.

Start-up cost matters with dozens of nodes on two cores: importing libp2p takes ~1.5 s of CPU,
so the launcher imports it once and forks each daemon from that warm process. Each child is an
ordinary ``prsm-node start`` with its own home, pid, lock and log file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import config as config_mod
from .control.client import ControlClient
from .exceptions import ControlError, DaemonNotRunning, HomeError
from .genesis import Validator, development_genesis
from .home import Home, init_home
from .keys import NodeKey

NETWORK_DIR = "network"


@dataclass
class DevnetNode:
    index: int
    peer_id: str
    addr: str
    home: str
    control: str


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; held open together so they are distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_faults(specs: list[str], nodes: int) -> dict[int, str]:
    """``["node3=silent", ...]`` → ``{3: "silent"}`` (HomeError on a bad spec)."""
    from .daemon import TEST_FAULTS

    out: dict[int, str] = {}
    for spec in specs:
        name, _, fault = spec.partition("=")
        index = name.removeprefix("node")
        if not index.isdigit() or int(index) >= nodes or fault not in TEST_FAULTS:
            raise HomeError(
                f"--test-fault {spec!r}: expected nodeI=FAULT with I < {nodes} "
                f"and FAULT one of {', '.join(TEST_FAULTS)}"
            )
        out[int(index)] = fault
    return out


def create(
    directory: Path, nodes: int, validators: int = 1, *, stake: int = 0, block_interval: float = 0.25
) -> list[DevnetNode]:
    """Write the network folder and every node's home; nodes 0..validators-1 validate.

    ``stake``: genesis stake of every node's account (0: none), so a devnet of breaker voters
    is staked from its first block instead of after one stake transaction per node.
    ``block_interval``: each node's ``ledger.block_interval`` (seconds)."""
    if not 1 <= validators <= nodes:
        raise HomeError(f"--validators must be between 1 and --nodes ({nodes}), got {validators}")
    keys = [NodeKey.generate() for _ in range(nodes)]
    ports = _free_ports(nodes)
    peer_ids = [str(k.peer_id) for k in keys]
    addrs = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}" for port, pid in zip(ports, peer_ids, strict=True)]
    genesis = development_genesis(
        "devnet",
        [Validator(account=keys[i].account.hex(), peer_id=peer_ids[i]) for i in range(validators)],
        [k.account.hex() for k in keys],
        stake=stake,
    )
    net_dir = directory / NETWORK_DIR
    net_dir.mkdir(parents=True, exist_ok=True)
    genesis.save(net_dir / "genesis.json")
    (net_dir / "peers.txt").write_text(f"# bootstrap peers of this devnet\n{addrs[0]}\n", encoding="utf-8")
    out = []
    for i, (key, port) in enumerate(zip(keys, ports, strict=True)):
        home = Home(directory / f"node{i}")
        cfg = config_mod.Config()
        cfg.p2p.listen = [f"/ip4/127.0.0.1/tcp/{port}"]
        cfg.discovery.bootstrap_backoff_initial = 0.2
        cfg.discovery.bootstrap_backoff_max = 5.0
        cfg.ledger.block_interval = block_interval
        init_home(home, network=str(net_dir.resolve()), force=True, cfg=cfg, genesis=genesis, key=key)
        out.append(DevnetNode(i, peer_ids[i], addrs[i], str(home.path), str(home.control_socket)))
    return out


def load(directory: Path) -> list[DevnetNode]:
    """The nodes of an existing devnet dir, in index order."""
    out = []
    i = 0
    while (directory / f"node{i}" / "config.toml").exists():
        home = Home(directory / f"node{i}")
        cfg = home.load_config()
        key = home.load_key()
        addr = f"{cfg.p2p.listen[0]}/p2p/{key.peer_id}"
        out.append(DevnetNode(i, str(key.peer_id), addr, str(home.path), str(home.control_socket)))
        i += 1
    return out


def spawn(node: DevnetNode, test_fault: str | None = None) -> int:
    """Fork one daemon process for ``node``; its output goes to <home>/node.log."""
    pid = os.fork()
    if pid:
        return pid
    # child: become an ordinary `prsm-node start --home <home>`
    code = 1
    try:
        os.setpgid(0, 0)  # a Ctrl-C at the terminal reaches the launcher, which stops us cleanly
        log_fd = os.open(Path(node.home) / "node.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        from .daemon import StartOptions, start

        code = start(StartOptions(home=Path(node.home), test_fault=test_fault))
    finally:
        os._exit(code)


def wait_ready(nodes: list[DevnetNode], *, table_size: int, timeout: float) -> None:
    """Wait (server side, no polling of state) until each node's routing table has ``table_size``."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"node{node.index} did not become ready within {timeout} s")
            try:
                with ControlClient(Path(node.control), timeout=left + 5) as client:
                    client.call("wait_routing_table", {"size": table_size, "timeout": max(left, 0.1)})
                break
            except DaemonNotRunning:
                _wait_for_socket(Path(node.control), left)
            except ControlError as exc:
                raise TimeoutError(f"node{node.index}: {exc.message}") from None


def _wait_for_socket(path: Path, timeout: float) -> None:
    """The daemon is still starting: wait for its control socket to appear (inotify-free)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # the socket may exist before it accepts; the caller's retry handles that
    if path.exists():
        time.sleep(0.01)


def stop_all(pids: dict[int, int], timeout: float = 15.0) -> dict[int, int]:
    """SIGTERM every daemon, wait for them, SIGKILL what is left. Returns exit codes by index."""
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    for index, pid in pids.items():
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[index] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[index] = -signal.SIGKILL
                break
            time.sleep(0.05)
    return codes


def run(
    directory: Path,
    nodes: int,
    *,
    fresh: bool,
    as_json: bool,
    ready_timeout: float,
    validators: int = 1,
    faults: dict[int, str] | None = None,
) -> int:
    directory = directory.resolve()
    existing = load(directory) if directory.exists() and not fresh else []
    if existing and len(existing) != nodes:
        raise HomeError(
            f"{directory} holds a devnet of {len(existing)} nodes; pass --nodes {len(existing)} "
            "or --fresh to make a new one"
        )
    if fresh and directory.exists():
        shutil.rmtree(directory)
    devnet = existing or create(directory, nodes, validators)
    for node in devnet:
        if Path(node.control).exists():
            try:
                with ControlClient(Path(node.control), timeout=2) as client:
                    client.call("id")
                raise HomeError(f"node{node.index} of {directory} is already running; stop it first")
            except DaemonNotRunning:
                pass
    import prsm_node.node  # noqa: F401  warm the import once; every fork inherits it

    started = time.monotonic()
    pids: dict[int, int] = {}
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for node in devnet:
            pids[node.index] = spawn(node, (faults or {}).get(node.index))
        wait_ready(devnet, table_size=min(nodes - 1, config_mod.DiscoverySection().bucket_size), timeout=ready_timeout)
        elapsed = time.monotonic() - started
        if as_json:
            print(
                json.dumps(
                    {
                        "dir": str(directory),
                        "ready_s": round(elapsed, 2),
                        "nodes": [asdict(n) | {"pid": pids[n.index]} for n in devnet],
                    }
                ),
                flush=True,
            )
        else:
            _print_table(devnet, pids, directory, elapsed)
        while True:  # supervise: report a daemon that dies on its own
            pid, status = os.wait()
            index = next(i for i, p in pids.items() if p == pid)
            del pids[index]
            print(
                f"node{index} exited with code {os.waitstatus_to_exitcode(status)} "
                f"(log: {devnet[index].home}/node.log)",
                file=sys.stderr,
                flush=True,
            )
            if not pids:
                return 1
    except KeyboardInterrupt:
        print("stopping the devnet…", file=sys.stderr, flush=True)
    except TimeoutError as exc:
        print(f"error: {exc}; logs are in each node's home (node.log)", file=sys.stderr, flush=True)
        stop_all(pids)
        return 1
    codes = stop_all(pids)
    bad = {i: c for i, c in codes.items() if c != 0}
    print(f"stopped {len(codes)} nodes" + (f"; non-zero exits: {bad}" if bad else ""), file=sys.stderr)
    return 0 if not bad else 1


def _print_table(devnet: list[DevnetNode], pids: dict[int, int], directory: Path, elapsed: float) -> None:
    print(f"devnet of {len(devnet)} nodes ready in {elapsed:.1f} s — {directory}")
    print(f"{'node':<6} {'pid':>7}  {'peer id':<52}  {'address':<24}  control socket")
    for n in devnet:
        addr = n.addr.split("/p2p/")[0]
        print(f"{'node' + str(n.index):<6} {pids[n.index]:>7}  {n.peer_id:<52}  {addr:<24}  {n.control}")
    first = devnet[0].home
    print(f"\ntry: prsm-node status --home {first}    |    prsm-node peers --home {first}")
    print("Ctrl-C stops every node.", flush=True)
