"""``prsm-node breaker``: vote to halt or resume a model, and show the breaker's state.

Registered in prsm_node/cli.py with ``app.add_typer(breaker_app, name="breaker")``. Talks to
the running daemon over the control socket (``breaker.vote``, ``breaker.status``).
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any

import typer

from ..cli_common import HomeOpt, JsonOpt, call_daemon
from ..ledger.types import format_amount

breaker_app = typer.Typer(help="The circuit breaker: vote to halt or resume a model; show halts.", no_args_is_help=True)

_call = call_daemon


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")


def _ftns(units: str) -> str:
    """A stake in the JSON's smallest units as FTNS (the ledger commands' unit)."""
    return f"{format_amount(int(units))} FTNS"


def _print_model(s: dict[str, Any]) -> None:
    flag = " (self-halted by this node)" if s["self_halted"] else ""
    typer.echo(f"model   {s['model']}")
    typer.echo(f"state   {s['state'].upper()}{flag}; network-wide {s['network_state']}")
    total = _ftns(s["total_stake"])
    typer.echo(f"halt    {_ftns(s['halt_stake'])} of {total} (needs {_ftns(s['halt_needed'])}, {s['halt_threshold']})")
    typer.echo(
        f"resume  {_ftns(s['resume_stake'])} of {total} (needs {_ftns(s['resume_needed'])}, {s['resume_threshold']})"
    )
    changed = s.get("changed")
    if changed:
        by = f" by {changed['voter'][:16]}…" if changed.get("voter") else f" at height {changed['height']}"
        typer.echo(f"changed {changed['state']} ({changed['cause']}{by}, {_when(changed.get('time_ms'))})")
    for v in s["voters"]:
        rec = v.get("recorded")
        ledger = f"ledger epoch {rec['epoch']} at height {rec['height']}" if rec else "not in the ledger yet"
        typer.echo(
            f"  {v['voter'][:16]}…  {v['action']:<6} stake {_ftns(v['stake']):<16} epoch {v['epoch']:<4} "
            f"{_when(v['timestamp_ms'])}  [{ledger}]  {v['reason']}"
        )


@breaker_app.command("vote")
def vote(
    model: Annotated[str, typer.Argument(help="Model (manifest id, 64 hex characters).")],
    halt: Annotated[bool, typer.Option("--halt", help="Vote to halt the model.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Vote to resume the model.")] = False,
    reason: Annotated[str, typer.Option(help="Why, for humans (at most 280 UTF-8 bytes).")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a halt or resume vote with this node's key and publish it.

    A halt vote stops the model on this node at once."""
    if halt == resume:
        typer.echo("error: pass exactly one of --halt or --resume", err=True)
        raise typer.Exit(2)
    result = _call(home, "breaker.vote", {"model": model, "action": "halt" if halt else "resume", "reason": reason})
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"voted {'halt' if halt else 'resume'} (epoch {result['epoch']}, vote {result['vote'][:16]}…)")
    _print_model(result)


@breaker_app.command("status")
def status(
    model: Annotated[str | None, typer.Argument(help="Model (manifest id) [default: every model].")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """State, stake for and against vs the thresholds, voters, and when it last changed."""
    result = _call(home, "breaker.status", {"model": model} if model else {})
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    models = [result] if model else result["models"]
    if not models:
        typer.echo("no votes: every model runs")
    for i, s in enumerate(models):
        if i:
            typer.echo("")
        _print_model(s)


@breaker_app.command("history")
def history(
    model: Annotated[str, typer.Argument(help="Model (manifest id, 64 hex characters).")],
    limit: Annotated[int, typer.Option(help="Most votes to show (oldest first).")] = 1000,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The votes on MODEL that the ledger recorded, in consensus order, with block heights."""
    result = _call(home, "breaker.history", {"model": model, "limit": limit})
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if not result["votes"]:
        typer.echo(f"no vote on {result['model']} in the ledger (height {result['height']})")
    for v in result["votes"]:
        typer.echo(
            f"height {v['height']:<6} {v['voter'][:16]}…  {v['action']:<6} epoch {v['epoch']:<4} "
            f"{_when(v['timestamp_ms'])}  by {v['submitter'][:16]}…  {v['reason']}"
        )
