"""The circuit breaker's halt hook on the model exchange: a halted model is not served (every
request answers ERROR halted), not fetched (``model.fetch`` answers ``halted``), a fetch running
when its model becomes halted stops before its next batch, and ``model ls``/``info`` say so.

The predicate is a plain function over a set: it stands for the breaker's decision, which is
all the exchange sees of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from prsm_node.control.server import RequestError
from prsm_node.exchange import ModelHalted, ModelMethods
from prsm_node.shards import ErrorCode, GetChunks, GetManifest, Have, HaveReply

from .conftest import running_nodes
from .test_exchange import SlowStore, ask, error_code, frame, publish, svc


async def test_a_halted_model_is_refused_by_the_responder_and_served_again_once_lifted(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, _ = await publish(alice, short_tmp / "src")
        halted = {mid}
        svc(alice).is_halted = halted.__contains__
        for request in (GetManifest(mid), Have(mid), GetChunks(mid, (0, 1))):
            assert error_code(await ask(bob, alice, frame(request))) == ErrorCode.HALTED, request
        assert svc(alice).errors_sent["halted"] == 3 and svc(alice).chunks_served == 0

        halted.clear()
        assert isinstance(await ask(bob, alice, frame(Have(mid))), HaveReply)


async def test_a_halted_model_is_not_fetched_and_ls_info_show_it(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, _ = await publish(alice, short_tmp / "src")
        svc(bob).is_halted = {mid}.__contains__
        with pytest.raises(ModelHalted):
            svc(bob).start_fetch(mid)
        methods = ModelMethods(svc(bob))
        with pytest.raises(RequestError) as refused:
            await methods.fetch({"ref": mid.hex()})
        assert refused.value.code == "halted" and "halted" in str(refused.value)
        assert svc(alice).requests_served == 0  # nothing was even asked

        publisher = ModelMethods(svc(alice))
        svc(alice).is_halted = {mid}.__contains__
        listed = (await publisher.ls({}))["models"]
        assert [(m["id"], m["halted"]) for m in listed] == [(mid.hex(), True)]
        assert (await publisher.info({"id": mid.hex()}))["halted"] is True
        svc(alice).is_halted = lambda _: False
        assert (await publisher.info({"id": mid.hex()}))["halted"] is False


async def test_a_fetch_stops_between_batches_when_its_model_becomes_halted(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, _ = await publish(alice, short_tmp / "src")
        svc(alice).store = SlowStore(alice.home.data_dir)
        halted: set[bytes] = set()
        svc(bob).is_halted = halted.__contains__

        f = svc(bob).start_fetch(mid)
        with trio.fail_after(20):
            await f.wait_until(lambda f: f.chunks_fetched >= 4)
        halted.add(mid)
        with trio.fail_after(10):
            await f.done.wait()
        assert f.state == "halted" and "halted" in (f.error or "")
        assert f.chunks_fetched < f.chunks_total
        served = svc(alice).chunks_served
        assert served <= f.chunks_fetched + 2 * 16  # at most the batches in flight when it was halted
        with pytest.raises(RequestError) as refused:
            await ModelMethods(svc(bob)).fetch({"ref": mid.hex()})
        assert refused.value.code == "halted"
        assert not [p for p in f.dest.rglob("*") if p.is_file()]  # nothing assembled, no partial file left
