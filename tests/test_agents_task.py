"""``/prsm/task/1.0.0`` between real in-process nodes sharing one devnet genesis: a remote task
is run, paid with payer-signed receipts (executor share + publisher royalty) and settled so
balances move exactly as the receipts say; malformed or unacceptable requests get clear codes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
import pytest
import trio

from prsm_node.agents import task_messages as m
from prsm_node.agents.task import TASK, account_of, sign_auth
from prsm_node.config import Config
from prsm_node.genesis import Validator, development_genesis
from prsm_node.home import Home, init_home
from prsm_node.keys import NodeKey
from prsm_node.node import Node
from prsm_node.wire import encode_uvarint, read_frame, write_frame

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tiny Opticks models (a few seconds of training, once per session)."""
    spec = importlib.util.spec_from_file_location("train_models", ROOT / "scripts" / "train_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_models"] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("models")
    assert module.main([str(out), "--tiny"]) == 0
    return out


@asynccontextmanager
async def agent_network(root: Path, names: list[str],
                        configure: Callable[[str, Config], None] | None = None) -> AsyncIterator[dict[str, Node]]:
    """Nodes sharing one genesis (the first is its solo validator and everyone's bootstrap peer;
    every account funded). ``configure(name, cfg)`` may change a node's test config."""
    keys = [NodeKey.generate() for _ in names]
    genesis = development_genesis(
        "agents", [Validator(account=keys[0].account.hex(), peer_id=str(keys[0].peer_id))],
        [k.account.hex() for k in keys],
    )
    genesis.params["agents_royalty"] = "1/10"
    nodes: dict[str, Node] = {}
    async with trio.open_nursery() as nursery:
        bootstrap: list[str] = []
        for name, key in zip(names, keys, strict=True):
            home = Home(root / name)
            cfg = Config.for_tests()
            if configure is not None:
                configure(name, cfg)
            init_home(home, cfg=cfg, genesis=genesis, key=key)
            node = Node(home, home.load_config(), key, genesis, list(bootstrap))
            ready = await nursery.start(node.run)
            bootstrap = bootstrap or [ready.addrs[0]]
            assert node.agents is not None
            node.agents.tasks.settler.interval = 0.1
            nodes[name] = node
        with trio.fail_after(10):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(len(names) - 1)
        try:
            yield nodes
        finally:
            for node in nodes.values():
                node.stop("test finished")


async def connect_all(nodes: dict[str, Node]) -> None:
    with trio.fail_after(10):
        for a in nodes.values():
            for b in nodes.values():
                if a is not b and b.host.get_id() not in a.host.get_network().connections:
                    await a.host.connect(b.host.get_peerstore().peer_info(b.host.get_id()))


async def publish(node: Node, trained: Path, name: str) -> bytes:
    doc = json.loads((trained / name / "spec.json").read_text())
    assert node.shards is not None
    with trio.fail_after(30):
        summary = await node.shards.publish(trained / name, name=name, version="1", tags=doc["tags"],
                                            metadata={"architecture": doc["architecture"]})
    return bytes.fromhex(summary["id"])


async def fetch(node: Node, mid: bytes) -> None:
    assert node.shards is not None
    with trio.fail_after(30):
        f = await node.shards.fetch(mid)
    assert f.state == "done", f.error


def balance(node: Node, account: bytes) -> int:
    assert node.chain is not None
    return node.chain.state.account(account).balance


async def wait_settled(*nodes: Node) -> None:
    with trio.fail_after(30):
        for _ in range(2):  # royalties reach the publisher after the executor's round
            for node in nodes:
                assert node.agents is not None
                await node.agents.tasks.settler.wait_idle()


async def wait_height(node: Node, height: int) -> None:
    assert node.chain is not None
    with trio.fail_after(20):
        await node.chain.wait_height(height)


async def entry_of(client: Node, server: Node, mid: bytes) -> m.CatalogueEntry:
    assert client.agents is not None
    with trio.fail_after(10):
        entries, _ = await client.agents.tasks.list_models(server.host.get_id())
    return next(e for e in entries if e.model_id == mid)


async def test_remote_task_is_paid_with_receipts_that_settle_exactly(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        await connect_all(nodes)
        lm = await publish(carol, trained, "opticks-lm")  # carol publishes; bob fetches and runs it
        await fetch(bob, lm)
        entry = await entry_of(alice, bob, lm)
        assert entry.publisher == carol.key.account and "text-generation" in entry.tags
        assert alice.chain is not None and alice.agents is not None and bob.agents is not None
        supply = alice.chain.state.total_supply
        before = {n: balance(alice, nodes[n].key.account) for n in nodes}

        inputs = {"prompt": "The Rays of Light", "max_new_tokens": 8, "temperature": 0.0}
        with trio.fail_after(30):
            out = await alice.agents.tasks.run_remote(bob.host.get_id(), entry, inputs, 10**18)
        assert isinstance(out.output, str) and out.usage.tokens_out == 8
        c = out.charge
        assert c.units == out.usage.tokens_in + out.usage.tokens_out
        assert c.amount == c.units * entry.price_per_unit and c.publisher_amount == c.amount // 10
        assert [r.payee for r in out.receipts] == [bob.key.account, carol.key.account]
        assert sum(r.amount for r in out.receipts) == c.amount
        assert bob.agents.tasks.statistics()["tasks_served"] == 1

        await wait_settled(bob, carol)
        assert carol.chain is not None
        await wait_height(alice, max(bob.chain.tip.height, carol.chain.tip.height))  # type: ignore[union-attr]
        after = {n: balance(alice, nodes[n].key.account) for n in nodes}
        assert after["alice"] == before["alice"] - c.amount
        assert after["bob"] == before["bob"] + c.executor_amount
        assert after["carol"] == before["carol"] + c.publisher_amount
        assert alice.chain.state.total_supply == supply
        for r in out.receipts:
            assert alice.chain.state.is_settled(r.payer, r.receipt_id)


async def raw(client: Node, server: Node, body: bytes, then: bytes | None = None) -> Any:
    with trio.fail_after(10):
        stream = await client.host.new_stream(server.host.get_id(), [TASK])
        try:
            await write_frame(stream, body)
            reply = m.decode_reply(await read_frame(stream, m.MAX_REPLY))
            if then is not None:
                await write_frame(stream, then)
                reply = (reply, m.decode_reply(await read_frame(stream, m.MAX_REPLY)))
            return reply
        finally:
            await stream.close()


async def test_malformed_and_unacceptable_task_requests_get_clear_errors(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        await connect_all(nodes)
        clf = await publish(bob, trained, "opticks-classifier")
        assert alice.agents is not None and bob.agents is not None
        chain = alice.genesis.chain_id
        good = m.Authorisation(alice.key.account, bob.key.account, clf, os.urandom(32), chain, 10**18,
                               int(time.time()) + 60)

        def run(auth: m.Authorisation, inputs: Any = None, key: NodeKey = alice.key, model: bytes = clf) -> bytes:
            signed = sign_auth(key, auth)
            return m.encode_request(m.Run(model, {"text": "colours"} if inputs is None else inputs, signed))

        stranger = NodeKey(b"\x42" * 32)
        forged = dataclasses.replace(sign_auth(alice.key, good), signature=bytes(64))
        cases = [
            (b"\xc1junk", "malformed"),
            (msgpack.packb([99]), "malformed"),
            (msgpack.packb([m.RUN, clf, {}, [1, 2]]), "malformed"),
            (m.encode_request(m.Run(clf, {"text": "x"}, forged)), "bad_signature"),
            (run(dataclasses.replace(good, chain_id="prsm-elsewhere")), "wrong_chain"),
            (run(dataclasses.replace(good, executor=alice.key.account)), "wrong_executor"),
            (run(dataclasses.replace(good, expiry=int(time.time()) - 1)), "expired"),
            (run(dataclasses.replace(good, model_id=b"\x07" * 32), model=b"\x07" * 32), "not_hosted"),
            (run(good, {"prompt": "not a classifier input"}), "invalid_input"),
            (run(dataclasses.replace(good, max_amount=1)), "price_too_low"),
            (run(dataclasses.replace(good, payer=stranger.account), key=stranger), "insufficient_funds"),
            (m.encode_request(m.Pay(os.urandom(32), (_receipt(alice, bob),))), "unknown_task"),
        ]
        for body, code in cases:
            reply = await raw(alice, bob, body)
            assert isinstance(reply, m.ErrorReply) and reply.code == code, (code, reply)
            assert reply.message

        # A too-large frame is refused before it is read.
        with trio.fail_after(10):
            stream = await alice.host.new_stream(bob.host.get_id(), [TASK])
            await stream.write(encode_uvarint(m.MAX_REQUEST + 1) + b"\x00" * 64)
            reply = m.decode_reply(await read_frame(stream, m.MAX_REPLY))
            assert isinstance(reply, m.ErrorReply) and reply.code == "too_large"
            await stream.close()

        # A good RUN whose payer answers with a wrong receipt: refused, and the payer owes.
        result, bad = await raw(alice, bob, run(good), m.encode_request(m.Pay(good.task_id, (_receipt(alice, bob),))))
        assert isinstance(result, m.Result) and result.charge.amount > 0
        assert isinstance(bad, m.ErrorReply) and bad.code == "bad_receipt"
        again = await raw(alice, bob, run(dataclasses.replace(good, task_id=os.urandom(32))))
        assert isinstance(again, m.ErrorReply) and again.code == "unpaid"
        served = bob.agents.tasks.tasks_served
        resent = await raw(alice, bob, run(good))  # the very RUN again: its RESULT again, nothing run twice
        assert resent == result and bob.agents.tasks.tasks_served == served
        replay = await raw(alice, bob, run(dataclasses.replace(good, max_amount=good.max_amount - 1)))
        assert isinstance(replay, m.ErrorReply) and replay.code == "replayed"

        # Paying the exact receipt on a new stream clears the debt.
        from prsm_node.agents.task import expected_receipts
        from prsm_node.ledger.signing import sign_receipt

        owed = expected_receipts(good.task_id, alice.key.account, bob.key.account, result.charge, chain)
        signed = tuple(sign_receipt(alice.key.signing_key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount,
                                    chain_id=chain) for r in owed)
        paid = await raw(alice, bob, m.encode_request(m.Pay(good.task_id, signed)))
        assert isinstance(paid, m.Paid)

        # A halted model is refused by the executor and left out of its catalogue.
        assert bob.breaker is not None
        bob.breaker.is_halted = lambda mid: mid == clf  # type: ignore[method-assign]
        halted = await raw(alice, bob, run(dataclasses.replace(good, task_id=os.urandom(32))))
        assert isinstance(halted, m.ErrorReply) and halted.code == "halted"
        catalogue = await raw(alice, bob, m.encode_request(m.ListModels()))
        assert isinstance(catalogue, m.Catalogue) and not catalogue.entries
        assert account_of(bob.host.get_id()) == bob.key.account


def _receipt(payer: Node, payee: Node) -> Any:
    from prsm_node.ledger.signing import sign_receipt

    key: nacl.signing.SigningKey = payer.key.signing_key
    return sign_receipt(key, receipt_id=os.urandom(32), payee=payee.key.account, amount=5,
                        chain_id=payer.genesis.chain_id)
