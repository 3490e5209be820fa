"""What every ``prsm-node`` command group shares: the ``--home``/``--json`` options, calling the
daemon over its control socket with a clear one-line error, and plain output helpers.

Kept apart from ``cli.py`` so that the groups defined in their own packages (``breaker``,
``agents``, ``consensus``) import it without importing the whole CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from .control.client import call
from .exceptions import ControlError, DaemonNotRunning
from .home import default_home

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Node home directory [default: $PRSM_HOME or ~/.prsm]", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def home_path(home: Path | None) -> Path:
    return (home or default_home()).expanduser()


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def call_daemon(home: Path | None, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """The daemon's answer, or exit 1 with ``error: <why>`` (no daemon, an error reply, no answer)."""
    try:
        return call(home_path(home), method, params, timeout=timeout)
    except DaemonNotRunning as exc:
        fail(str(exc))
    except ControlError as exc:
        fail(exc.message)
    except TimeoutError:
        fail(f"the daemon did not answer {method!r} within {timeout} s")


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def table(rows: list[list[str]], header: list[str]) -> None:
    """Columns padded to their widest cell; an all-empty header (a key/value list) prints no line."""
    lines = [header, *rows] if any(header) else rows
    widths = [max([len(str(r[i])) for r in lines], default=0) for i in range(len(header))]
    for row in lines:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
