"""Real daemon processes for tests: a devnet started through the CLI, single daemons, waits.

Every wait here is on a condition: a line the process prints, a control call that blocks in
the daemon until its state is reached, or the home's lock being released by a dying process.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prsm_node.control.client import ControlClient

CLI = [sys.executable, "-m", "prsm_node"]


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def control(home: str | Path, method: str, timeout: float = 30, **params: Any) -> Any:
    with ControlClient(Path(home) / "control.sock", timeout=timeout) as client:
        return client.call(method, params)


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """Read one stdout line, failing after ``timeout`` seconds (no busy wait)."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not out:
        raise TimeoutError(f"no line from pid {proc.pid} within {timeout} s")
    return out[0]


def wait_lock_released(home: str | Path, timeout: float = 30) -> None:
    """Block until no daemon holds the home's lock: the process has really exited."""
    done = threading.Event()

    def take() -> None:
        with open(Path(home) / "node.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        done.set()

    threading.Thread(target=take, daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"{home}: daemon still holds node.lock after {timeout} s")


@dataclass
class DevnetInfo:
    dir: Path
    nodes: list[dict[str, Any]]
    proc: subprocess.Popen[str]


@contextmanager
def devnet(directory: Path, nodes: int, *, ready_timeout: float = 90) -> Iterator[DevnetInfo]:
    proc = subprocess.Popen(
        [
            *CLI,
            "devnet",
            "--nodes",
            str(nodes),
            "--dir",
            str(directory),
            "--json",
            "--ready-timeout",
            str(ready_timeout),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = readline(proc, ready_timeout + 30)
        if not line:
            raise RuntimeError(f"devnet failed: {proc.stderr.read() if proc.stderr else ''}")
        info = json.loads(line)
        yield DevnetInfo(directory, info["nodes"], proc)
    finally:
        proc.send_signal(signal.SIGINT)  # the launcher stops every node, then exits
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            _close_pipes(proc)


@contextmanager
def daemon(home: Path, *args: str, timeout: float = 30) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """One `prsm-node start` process; yields it with its ready line."""
    proc = subprocess.Popen(
        [*CLI, "start", "--home", str(home), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = readline(proc, timeout)
        if not line.startswith("prsm-node ready"):
            proc.wait(timeout=10)
            raise RuntimeError(f"daemon did not start (exit {proc.returncode}): {proc.stderr.read()}")  # type: ignore[union-attr]
        yield proc, line
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
