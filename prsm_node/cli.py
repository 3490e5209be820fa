"""``prsm-node``: the command line. ``start`` runs the daemon; most other commands talk to it
over the control socket and print a table, or JSON with ``--json``.

Exit codes: 0 success, 1 runtime failure (including "no daemon running"), 2 usage/config error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .agents.cli import agents_app
from .agents.cli import ask as agents_ask
from .breaker.cli import breaker_app
from .cli_common import HomeOpt, JsonOpt, call_daemon, fail, home_path, print_json, table
from .consensus.cli import consensus_app
from .control.client import call
from .exceptions import ConfigError, HomeError
from .home import DEV_NETWORK, Home, init_home

app = typer.Typer(
    name="prsm-node",
    help="PRSM node daemon: host, share and run AI models on a peer-to-peer network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_home = home_path
_fail = fail
_call = call_daemon
_print_json = print_json
_table = table


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"prsm-node {__version__}")


@app.command()
def init(
    home: HomeOpt = None,
    network: Annotated[
        str, typer.Option(help='Network: a folder under bootstrap/, a path to one, or "dev" (a fresh private one).')
    ] = DEV_NETWORK,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing home (its data is removed).")] = False,
) -> None:
    """Create a node home: config.toml, genesis.json and a new Ed25519 node key."""
    target = Home(_home(home))
    try:
        key = init_home(target, network=network, force=force)
    except (ConfigError, HomeError) as exc:
        _fail(str(exc), 2)
    typer.echo(f"initialised {target.path}")
    typer.echo(f"  peer id  {key.peer_id}")
    typer.echo(f"  network  {network}")
    typer.echo(f"start it with: prsm-node start --home {target.path}")


@app.command()
def start(
    home: HomeOpt = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="Listen multiaddr (repeatable); replaces [p2p].listen.")
    ] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option(help="Extra bootstrap peer multiaddr with /p2p/ (repeatable).")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json; overrides [node].log_format.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    test_fault: Annotated[
        str | None,
        typer.Option(help="TESTS ONLY: make this validator misbehave: equivocate, bad-signatures or silent."),
    ] = None,
) -> None:
    """Run the daemon in the foreground (creates the default home if there is none)."""
    from .daemon import StartOptions
    from .daemon import start as start_daemon

    code = start_daemon(StartOptions(_home(home), listen or [], bootstrap or [], log_format, log_level, test_fault))
    raise typer.Exit(code)


@app.command()
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the running node: peer id, addresses, network, uptime, peers, routing table."""
    st = _call(home, "status")
    if as_json:
        return _print_json(st)
    rows = [
        ["peer id", st["peer_id"]],
        ["network", f"{st['network']} ({st['chain_id']})"],
        ["version", st["version"]],
        ["uptime", f"{st['uptime_s']:.0f} s"],
        ["connected peers", str(st["connected_peers"])],
        ["routing table", f"{st['routing_table_size']} peers"],
        *[["address", a] for a in st["addrs"]],
    ]
    _table(rows, ["", ""])


@app.command("id")
def id_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show this node's peer id, ledger account and addresses."""
    ident = _call(home, "id")
    if as_json:
        return _print_json(ident)
    typer.echo(f"peer id  {ident['peer_id']}")
    typer.echo(f"account  {ident['account']}")
    for a in ident["addrs"]:
        typer.echo(f"address  {a}")


@app.command()
def peers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List connected peers."""
    result = _call(home, "peers")
    if as_json:
        return _print_json(result)
    if not result:
        typer.echo("no connected peers")
        return
    _table(
        [
            [p["peer_id"], p["direction"], "yes" if p["in_routing_table"] else "no", ", ".join(p["addrs"])]
            for p in result
        ],
        ["PEER ID", "DIRECTION", "ROUTING", "ADDRESSES"],
    )


@app.command("find-peer")
def find_peer(
    peer_id: str,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    lookup: Annotated[bool, typer.Option("--lookup", help="Always ask the DHT, even for a known peer.")] = False,
) -> None:
    """Find a peer's addresses through the DHT and connect to it."""
    result = _call(home, "find_peer", {"peer_id": peer_id, "lookup": lookup})
    if as_json:
        return _print_json(result)
    typer.echo(f"{result['peer_id']} found in {result['ms']:.1f} ms")
    for a in result["addrs"]:
        typer.echo(f"  {a}")


@app.command()
def stop(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop the running daemon gracefully."""
    result = _call(home, "stop")
    if as_json:
        return _print_json(result)
    typer.echo("stopping")


@app.command()
def devnet(
    nodes: Annotated[int, typer.Option(min=1, max=200, help="Number of daemon processes.")] = 4,
    directory: Annotated[Path, typer.Option("--dir", help="Where the devnet's homes live.")] = Path("devnet"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete --dir and create a new devnet.")] = False,
    as_json: JsonOpt = False,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait until every node is discovered.")] = 120.0,
    validators: Annotated[int, typer.Option(min=1, help="How many nodes (node0 on) are genesis validators.")] = 1,
    test_fault: Annotated[
        list[str] | None, typer.Option(help="TESTS ONLY: nodeI=FAULT (equivocate, bad-signatures, silent).")
    ] = None,
) -> None:
    """Start N real daemons on 127.0.0.1 with a shared genesis; Ctrl-C stops them all."""
    from . import devnet as devnet_mod

    try:
        faults = devnet_mod.parse_faults(test_fault or [], nodes)
        code = devnet_mod.run(
            directory,
            nodes,
            fresh=fresh,
            as_json=as_json,
            ready_timeout=ready_timeout,
            validators=validators,
            faults=faults,
        )
    except (ConfigError, HomeError) as exc:
        _fail(str(exc), 2)
    raise typer.Exit(code)


# ---- ledger ---------------------------------------------------------------------------

ledger_app = typer.Typer(help="The FTNS ledger: balances, transfers, stake, blocks.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(consensus_app, name="consensus")

FeeOpt = Annotated[str, typer.Option(help="Fee in FTNS, paid to the block's proposer.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Return once the node accepts the tx.")]
TimeoutOpt = Annotated[float | None, typer.Option(help="Seconds to wait for the block [default: config].")]


def _ftns(amount: dict[str, str]) -> str:
    return f"{amount['ftns']} FTNS"


def _short(hex_text: str) -> str:
    return hex_text[:16] + "…"


@ledger_app.command("status")
def ledger_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Height, last block, state hash, total supply, mempool."""
    st = _call(home, "ledger.status")
    if as_json:
        return _print_json(st)
    _table(
        [
            ["chain", st["chain_id"]],
            ["role", st["role"]],
            ["height", str(st["height"])],
            ["block hash", st["block_hash"]],
            ["state hash", st["state_hash"]],
            ["total supply", _ftns(st["total_supply"])],
            ["mempool", f"{st['mempool_size']} txs"],
        ],
        ["", ""],
    )


@ledger_app.command("balance")
def ledger_balance(
    account: Annotated[str | None, typer.Argument(help="Account (hex public key) [default: this node's].")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """An account's balance, stake, unbonding stake and nonce."""
    result = _call(home, "ledger.balance", {"account": account} if account else {})
    if as_json:
        return _print_json(result)
    rows = [
        ["account", result["account"]],
        ["balance", _ftns(result["balance"])],
        ["stake", _ftns(result["stake"])],
        *[["unbonding", f"{_ftns(u['amount'])} until block {u['release_height']}"] for u in result["unbonding"]],
        ["nonce", str(result["nonce"])],
    ]
    _table(rows, ["", ""])


def _send(home: Path | None, method: str, params: dict[str, Any], no_wait: bool, timeout: float | None,
          as_json: bool) -> None:
    params = {**params, "wait": not no_wait}
    if timeout is not None:
        params["timeout"] = timeout
    result = _call(home, method, params, timeout=(timeout or 600.0) + 10)
    if as_json:
        return _print_json(result)
    where = f" in block {result['height']}" if result["status"] == "committed" else " (pending)"
    typer.echo(f"{result['kind']} {result['hash']}{where}")


@ledger_app.command("transfer")
def ledger_transfer(
    to: Annotated[str, typer.Argument(help="Recipient account (hex public key).")],
    amount: Annotated[str, typer.Argument(help="Exact amount in FTNS, e.g. 1.5")],
    fee: FeeOpt = "0",
    no_wait: NoWaitOpt = False,
    timeout: TimeoutOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send FTNS from this node's account; waits until a block holds it."""
    _send(home, "ledger.transfer", {"to": to, "amount": amount, "fee": fee}, no_wait, timeout, as_json)


@ledger_app.command("stake")
def ledger_stake(
    amount: Annotated[str, typer.Argument(help="Exact amount in FTNS.")],
    fee: FeeOpt = "0",
    no_wait: NoWaitOpt = False,
    timeout: TimeoutOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move FTNS from this node's balance to its stake."""
    _send(home, "ledger.stake", {"amount": amount, "fee": fee}, no_wait, timeout, as_json)


@ledger_app.command("unstake")
def ledger_unstake(
    amount: Annotated[str, typer.Argument(help="Exact amount in FTNS.")],
    fee: FeeOpt = "0",
    no_wait: NoWaitOpt = False,
    timeout: TimeoutOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start unbonding stake; it returns to the balance after the unbonding delay (in blocks)."""
    _send(home, "ledger.unstake", {"amount": amount, "fee": fee}, no_wait, timeout, as_json)


@ledger_app.command("tx")
def ledger_tx(
    tx_hash: Annotated[str, typer.Argument(metavar="HASH", help="Transaction hash (hex).")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A transaction, committed or pending."""
    result = _call(home, "ledger.tx", {"hash": tx_hash})
    if as_json:
        return _print_json(result)
    rows = [[k, _describe(v)] for k, v in result.items()]
    _table(rows, ["", ""])


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "ftns" in value:
        return _ftns(value)
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


@ledger_app.command("block")
def ledger_block(
    height: Annotated[int | None, typer.Argument(help="Block height [default: the latest].")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A block's header and transactions."""
    result = _call(home, "ledger.block", {"height": height} if height is not None else {})
    if as_json:
        return _print_json(result)
    _table([[k, str(v)] for k, v in result.items() if k != "txs"], ["", ""])
    if result["txs"]:
        typer.echo("")
        _table(
            [[t["hash"], t["kind"], _short(t["sender"]), str(t["nonce"]), _ftns(t["amount"])] for t in result["txs"]],
            ["TX", "KIND", "SENDER", "NONCE", "AMOUNT"],
        )


@ledger_app.command("history")
def ledger_history(
    account: Annotated[str | None, typer.Argument(help="Account (hex public key) [default: this node's].")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most transactions to show.")] = 50,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed transactions that touch an account, newest first."""
    result = _call(home, "ledger.history", {"limit": limit, **({"account": account} if account else {})})
    if as_json:
        return _print_json(result)
    if not result["txs"]:
        typer.echo("no transactions")
        return
    _table(
        [
            [str(t["height"]), t["hash"], t["kind"], _short(t["sender"]), t.get("to", "")[:16], _ftns(t["amount"])]
            for t in result["txs"]
        ],
        ["BLOCK", "TX", "KIND", "FROM", "TO", "AMOUNT"],
    )


@ledger_app.command("verify")
def ledger_verify(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Replay every stored block from genesis and check the state hash (exit 1 on mismatch)."""
    result = _call(home, "ledger.verify", timeout=600.0)
    if as_json:
        _print_json(result)
    else:
        verdict = "ok" if result["ok"] else "MISMATCH"
        typer.echo(f"{verdict}: replayed {result['height']} blocks, state hash {result['replayed_state_hash']}")
    if not result["ok"]:
        raise typer.Exit(1)


# ---- model ----------------------------------------------------------------------------

model_app = typer.Typer(help="Models: publish, fetch, list, inspect and remove shared models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

POLL_INTERVAL = 0.25
FETCH_END_STATES = ("done", "failed", "cancelled")


LOCAL_MODEL_HELP = "Manifest id, a unique prefix of it, or NAME[:VERSION]."


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _progress_line(p: dict[str, Any], width: int = 30) -> str:
    total = p["bytes_total"] or 0
    done = p["bytes_done"] or 0
    frac = done / total if total else 0.0
    filled = int(frac * width)
    eta = f"ETA {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
    name = f"{p['name']}:{p['version']}" if p.get("name") else p["id"][:16]
    return (f"{name} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{_bytes(done)}/{_bytes(total)} {p['rate_bps'] / 1e6:.1f} MB/s {eta} {p['state']}")


@model_app.command("publish")
def model_publish(
    path: Annotated[Path, typer.Argument(help="A .safetensors file or a folder of them.")],
    name: Annotated[str, typer.Option("--name", help="Model name, e.g. org/model.")],
    version: Annotated[str, typer.Option("--version", help="Version, e.g. 1.0.0.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    license: Annotated[str, typer.Option("--license", help="SPDX license id.")] = "",
    tags: Annotated[str, typer.Option(help="Capability tags, comma-separated (lm,embedding).")] = "",
    metadata_json: Annotated[
        Path | None, typer.Option("--metadata-json", help="A JSON file holding an object: the model's metadata.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Chunk size in bytes (a power of two).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Chunk, sign and store a model, and announce this node as its provider."""
    params: dict[str, Any] = {
        "path": str(path.expanduser().resolve()),
        "name": name,
        "version": version,
        "description": description,
        "license": license,
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
    }
    if metadata_json is not None:
        try:
            metadata = json.loads(metadata_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {metadata_json}: {exc}", 2)
        if not isinstance(metadata, dict):
            _fail(f"{metadata_json} must hold a JSON object", 2)
        params["metadata"] = metadata
    if chunk_size is not None:
        params["chunk_size"] = chunk_size
    result = _call(home, "model.publish", params, timeout=3600.0)
    if as_json:
        return _print_json(result)
    typer.echo(f"published {result['name']}:{result['version']} {result['id']}")
    typer.echo(f"  {len(result['files'])} files, {_bytes(result['total_size'])}, {result['chunks']} chunks")


@model_app.command("fetch")
def model_fetch(
    ref: Annotated[str, typer.Argument(metavar="ID|NAME[:VERSION]", help="Manifest id or model name.")],
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a model from its providers (resumes an interrupted fetch); Ctrl-C cancels it."""
    started = _call(home, "model.fetch", {"ref": ref, "wait": False}, timeout=120.0)
    mid = started["id"]
    deadline = time.monotonic() + timeout if timeout else None
    progress = started
    drawn = False
    try:
        while progress["state"] not in FETCH_END_STATES:
            if deadline is not None and time.monotonic() > deadline:
                _fail(f"fetch of {mid} still running after {timeout} s; `model fetch` again attaches to it")
            time.sleep(POLL_INTERVAL)
            progress = _call(home, "model.progress", {"id": mid})
            if not as_json:
                typer.echo("\r" + _progress_line(progress) + "\033[K", err=True, nl=False)
                drawn = True
    except KeyboardInterrupt:
        try:
            call(_home(home), "model.cancel", {"id": mid}, timeout=10.0)
        except Exception:  # the daemon may be gone: nothing to cancel
            pass
        typer.echo("\ninterrupted: fetch cancelled; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if drawn:
        typer.echo("", err=True)
    if progress["state"] != "done":
        _fail(f"fetch {progress['state']}: {progress['error']}")
    if as_json:
        return _print_json(progress)
    typer.echo(f"fetched {progress['name']}:{progress['version']} {mid}")
    typer.echo(f"  {progress['chunks_fetched']} chunks fetched, {progress['chunks_present']} already here, "
               f"from {_plural(sum(1 for p in progress['providers'] if p['chunks']), 'provider')}")
    typer.echo(f"  {progress['path']}")


@model_app.command("ls")
def model_ls(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Models stored on this node, complete or not."""
    result = _call(home, "model.ls")
    if as_json:
        return _print_json(result)
    if not result["models"]:
        typer.echo("no models")
    else:
        rows = []
        for m in result["models"]:
            state = "complete" if m["complete"] else f"{m['chunks_present']}/{m['chunks']} chunks"
            rows.append([m["id"][:16], m["name"], m["version"], _bytes(m["total_size"]),
                         "fetching" if m["fetching"] else state])
        _table(rows, ["ID", "NAME", "VERSION", "SIZE", "STATE"])
    quota = f" of {_bytes(result['quota'])}" if result["quota"] is not None else ""
    typer.echo(f"store: {_bytes(result['usage'])}{quota}")


@model_app.command("info")
def model_info(
    model_id: Annotated[str, typer.Argument(metavar="MODEL", help=LOCAL_MODEL_HELP)],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A stored model's manifest and local state."""
    result = _call(home, "model.info", {"id": model_id})
    if as_json:
        return _print_json(result)
    rows = [[k, str(result[k])] for k in ("id", "name", "version", "description", "license", "publisher",
                                          "chunk_size", "chunks", "chunks_present", "complete", "path")]
    rows += [["tags", ",".join(result["tags"])], ["size", _bytes(result["total_size"])]]
    _table(rows, ["", ""])
    typer.echo("")
    _table([[f["path"], _bytes(f["size"]), str(f["tensors"])] for f in result["files"]], ["FILE", "SIZE", "TENSORS"])


@model_app.command("rm")
def model_rm(
    model_id: Annotated[str, typer.Argument(metavar="MODEL", help=LOCAL_MODEL_HELP)],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a model: its manifest, its files and the record of its verified chunks."""
    result = _call(home, "model.rm", {"id": model_id})
    if as_json:
        return _print_json(result)
    typer.echo(f"removed {result['id']} ({_bytes(result['freed_bytes'])} freed)")

# ---- breaker --------------------------------------------------------------------------

app.add_typer(breaker_app, name="breaker")
app.add_typer(agents_app, name="agents")
app.command("ask")(agents_ask)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
