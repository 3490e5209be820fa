"""``prsm-node ask`` and ``prsm-node agents``: ask the NWTN pipeline, show the agents' state.

Registered in prsm_node/cli.py with ``app.add_typer(agents_app, name="agents")`` and
``app.command("ask")(ask)``. Talks to the running daemon over the control socket
(``agents.ask``, ``agents.status``).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cli_common import HomeOpt, JsonOpt, call_daemon
from ..ledger.types import format_amount

agents_app = typer.Typer(help="NWTN agents: the model runtime and the tasks this node serves.", no_args_is_help=True)

_call = call_daemon


def ask(
    query: Annotated[str, typer.Argument(help="The question.")],
    budget: Annotated[str, typer.Option("--budget", help="Most FTNS to spend (e.g. 0.5).")] = "1",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the answer.")] = 120.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the network: the NWTN pipeline splits the query over models on other peers."""
    result = _call(home, "agents.ask", {"query": query, "budget": budget, "timeout": timeout}, timeout=timeout + 10)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(result["answer"])
    typer.echo("")
    estimate, budget = (format_amount(int(result[k])) for k in ("estimate", "budget"))
    typer.echo(f"cost {result['cost_ftns']} FTNS (estimate {estimate}, budget {budget}) in {result['ms']} ms")
    for row in result["trace"]:
        peer = row["peer"] or "-"
        error = f"  ({row['error']})" if row["error"] else ""
        typer.echo(f"  {row['subtask']:<9} {row['model'] or '-':<20} {peer[:16]:<16} {row['ms']:>8} ms  "
                   f"{row['units']:>6} units  {row['cost_ftns']} FTNS{error}")


@agents_app.command("status")
def agents_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Models loaded, device, queue, tasks served."""
    st = _call(home, "agents.status", {})
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    rt, tasks = st["runtime"], st["tasks"]
    device = rt["device"]
    if device == "auto":  # torch is imported, and the device chosen, when the first model loads
        device = "auto (cuda if torch sees one, else cpu: chosen when the first model loads)"
    typer.echo(f"device       {device}")
    typer.echo(f"memory       {rt['bytes_in_use']} of {rt['memory_limit_bytes']} bytes")
    typer.echo(f"queue        {rt['queue_length']}")
    typer.echo(f"tasks served {tasks['tasks_served']} "
               f"(running {tasks['tasks_running']}, unpaid {tasks['unpaid_tasks']})")
    typer.echo(f"receipts     {tasks['receipts_to_settle']} to settle, {tasks['receipts_settled']} settled")
    typer.echo(f"queries      {st['queries_answered']}")
    for m in rt["models"]:
        typer.echo(f"  loaded {m['model_id'][:16]}  {m['family']}  served {m['served']}")
    for h in st["hosted"]:
        typer.echo(f"  hosted {h['model_id'][:16]}  {h['name']}  {h['family']}  price {h['price_per_unit']}")
