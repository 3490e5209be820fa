"""``prsm-node start``: load the home, take the lock, run the node under trio, handle signals.

Exit codes: 0 clean stop, 1 runtime failure (including a home already in use), 2 usage or
config error.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import logs
from ._trio import TaskStatus
from .config import Config, parse_multiaddr
from .exceptions import ConfigError, HomeError, LockedError, PrsmError
from .home import Home, HomeLock, init_home
from .logs import kv

TEST_FAULTS = ("equivocate", "bad-signatures", "silent")  # prsm_node.consensus.faults.TEST_FAULTS
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections, once the node is ready (see _run)

if TYPE_CHECKING:  # the real import waits until the node really starts (libp2p is heavy)
    from .node import Node, Ready

log = logging.getLogger("prsm_node")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@dataclass
class StartOptions:
    home: Path
    listen: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    log_format: str | None = None
    log_level: str | None = None
    test_fault: str | None = None  # equivocate | bad-signatures | silent (tests only)


def apply_flags(cfg: Config, opts: StartOptions) -> Config:
    """Flags override config.toml: --listen replaces the list, --bootstrap adds to it."""
    if opts.listen:
        cfg.p2p.listen = list(opts.listen)
        for i, addr in enumerate(opts.listen):
            parse_multiaddr(addr, f"--listen[{i}]", need_peer_id=False)
    for i, addr in enumerate(opts.bootstrap):
        parse_multiaddr(addr, f"--bootstrap[{i}]", need_peer_id=True)
    cfg.p2p.bootstrap = [*cfg.p2p.bootstrap, *opts.bootstrap]
    if opts.log_format is not None:
        cfg.node.log_format = opts.log_format
    if opts.log_level is not None:
        cfg.node.log_level = opts.log_level
    cfg.validate()
    return cfg


def start(opts: StartOptions) -> int:
    home = Home(opts.home)
    try:
        if not home.exists():
            init_home(home)
            print(f"initialised a new node home at {home.path}", file=sys.stderr)
        cfg = apply_flags(home.load_config(), opts)
        if opts.test_fault is not None and opts.test_fault not in TEST_FAULTS:
            raise ConfigError(f"--test-fault: one of {', '.join(TEST_FAULTS)}, got {opts.test_fault!r}")
        key = home.load_key()
        genesis = home.load_genesis()
        network = home.network(cfg)
        bootstrap = [*(network.bootstrap_peers() if network else []), *cfg.p2p.bootstrap]
        home.check_socket_path()
    except (ConfigError, HomeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(cfg.node.log_level, cfg.node.log_format)
    lock = HomeLock(home)
    try:
        lock.acquire()
    except LockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        from .node import Node  # libp2p is heavy: import it only to really start

        node = Node(home, cfg, key, genesis, bootstrap)
        node.test_fault = opts.test_fault
        trio.run(_run, node)
    except Exception as exc:
        # trio hands errors out of nurseries as ExceptionGroups: find our own error inside.
        ours = _ours(exc)
        if ours is not None:
            log.error("node failed", extra=kv(error=str(ours)))
            print(f"error: {ours}", file=sys.stderr)
        else:
            log.exception("node failed")
            print(f"error: the node stopped on an unexpected failure: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
    log.info("node stopped", extra=kv(reason=node.stop_reason or "unknown"))
    return EXIT_OK


def _ours(exc: BaseException) -> PrsmError | None:
    if isinstance(exc, PrsmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _ours(inner)
            if found is not None:
                return found
    return None


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def _run(node: Node) -> None:
    async with trio.open_nursery() as nursery:

        async def run_node(*, task_status: TaskStatus[Ready] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await node.run(task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()  # the node is done: stop watching signals

        nursery.start_soon(_watch_signals, node)
        ready = await nursery.start(run_node)
        # Everything built so far (libp2p, the stores, the routing table) lives as long as the
        # daemon: frozen, the collector no longer walks it. Without this a full collection
        # walks the whole heap: 0.2-0.3 s on a busy node, landing in the middle of a query load
        # (measured: one 261 ms pause in a 2 s load of 1,000 asks; none with the freeze).
        gc.collect()
        gc.freeze()
        # Young collections every GC_YOUNG_THRESHOLD allocations rather than 700: a busy
        # validator allocates a few objects per tx at every step, and at 700 it spent ~6% of
        # its CPU in ~550 young and 5 full collections in a 26 s saturation run of
        # scripts/bench/consensus.py (gc.callbacks: 1.9-2.5 s per validator); at 20,000, in
        # 6-14 young and one full collection (0.4-1.0 s). What a young collection finds is
        # cyclic garbage only (refcounting frees the rest), so memory barely changes.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        print(ready.line(), flush=True)


async def _watch_signals(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                node.stop(f"received {name}")
            else:
                log.warning("second signal: exiting now", extra=kv(signal=name))
                os._exit(EXIT_FAILURE)
