"""``prsm-node consensus ...``: the PBFT replica of a running validator (``consensus.status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

consensus_app = typer.Typer(help="PBFT consensus: view, primary, checkpoints, validators.", no_args_is_help=True)


@consensus_app.command("status")
def consensus_status(
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Node home directory [default: $PRSM_HOME or ~/.prsm]", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show the view, the primary, the height, the last stable checkpoint and each validator."""
    from ..cli_common import call_daemon as _call
    from ..cli_common import print_json as _print_json
    from ..cli_common import table as _table

    st = _call(home, "consensus.status")
    if as_json:
        _print_json(st)
        return
    typer.echo(f"role        {st['role']}{'' if st['enabled'] else ' (no PBFT replica here)'}")
    typer.echo(f"height      {st['height']}  {st['block_hash'][:16]}")
    if st["enabled"]:
        typer.echo(f"view        {st['view']}{'' if st['active'] else ' (changing views)'}")
        typer.echo(f"primary     {st['primary'][:16]}{' (this node)' if st['is_primary'] else ''}")
        cp = st["stable_checkpoint"]
        typer.echo(f"checkpoint  {cp['seq']}  {cp['digest'][:16]}")
    if st.get("test_fault"):
        typer.echo(f"TEST FAULT  {st['test_fault']}")
    rows = []
    for v in st["validators"]:
        heard = v["last_heard_s_ago"]
        rows.append(
            [
                str(v["index"]),
                v["account"][:16],
                (v["peer_id"] or "")[:20],
                "self" if v["self"] else ("-" if heard is None else f"{heard:.1f} s ago"),
                "yes" if v["primary"] else "",
                str(v["invalid_messages"]),
            ]
        )
    typer.echo("")
    _table(rows, ["#", "ACCOUNT", "PEER ID", "LAST HEARD", "PRIMARY", "INVALID"])
