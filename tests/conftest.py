"""Shared test harness: in-process nodes on 127.0.0.1 port 0 in temp homes, and real daemons."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from prsm_node.config import Config
from prsm_node.home import Home, init_home
from prsm_node.node import Node


@pytest.fixture
def short_tmp() -> Path:
    """A short temp dir: Unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="prsm-") as d:
        yield Path(d)


@asynccontextmanager
async def running_nodes(root: Path, names: list[str], *, cfg: Config | None = None) -> AsyncIterator[dict[str, Node]]:
    """Start one Node per name, in order; the first is the bootstrap peer of the others."""
    nodes: dict[str, Node] = {}
    async with trio.open_nursery() as nursery:
        bootstrap: list[str] = []
        for name in names:
            home = Home(root / name)
            init_home(home, cfg=cfg or Config.for_tests())
            node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), list(bootstrap))
            ready = await nursery.start(node.run)
            bootstrap = bootstrap or [ready.addrs[0]]
            nodes[name] = node
        try:
            yield nodes
        finally:
            for node in nodes.values():
                node.stop("test finished")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
