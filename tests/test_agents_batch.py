"""Batched tasks (``RUN_BATCH``/``BATCH_RESULT`` on ``/prsm/task/1.0.0``), the client that
coalesces concurrent requests into them, the runtime's ``run_many``, the passage index and the
embedding cache: a batch runs every input that fits and refuses the others one by one, is
charged for what ran, paid with one PAY and settled exactly; a bad batch is refused whole with a
clear code; a cached retrieval answers as an uncached one does."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.agents import task_messages as m
from prsm_node.agents.exceptions import RuntimeBusy
from prsm_node.agents.inputs import Usage
from prsm_node.agents.nwtn.architect import PassageIndex, candidate_passages, load_passages
from prsm_node.agents.nwtn.cache import EmbeddingCache, VectorsUnavailable, cosines, unit_vector
from prsm_node.agents.pricing import Charge, charge_for
from prsm_node.agents.runtime import RuntimeConfig, open_runtime
from prsm_node.agents.task import TASK, expected_receipts, sign_auth
from prsm_node.ledger.signing import sign_receipt
from prsm_node.node import Node
from prsm_node.wire import encode_uvarint, read_frame

from .test_agents_task import (
    agent_network,
    balance,
    connect_all,
    entry_of,
    fetch,
    publish,
    raw,
    trained,
    wait_height,
    wait_settled,
)

__all__ = ["trained"]

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus" / "newton_opticks.txt"


# ------------------------------------------------------------ messages


_inputs = st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=20), st.integers(0, 99),
                                                        st.lists(st.text(max_size=10), max_size=3)), max_size=3)
_usage = st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6),
                   st.floats(0, 1e6, allow_nan=False), st.integers(0, 64), st.sampled_from(["cpu", "cuda"]))


def _auth(model: bytes = b"\x0a" * 32, **changes: Any) -> m.Authorisation:
    fields = dict(payer=b"\x01" * 32, executor=b"\x02" * 32, model_id=model, task_id=b"\x0b" * 32,
                  chain_id="prsm-test", max_amount=10**15, expiry=1_900_000_000, signature=b"\x05" * 64)
    fields.update(changes)
    return m.Authorisation(**fields)  # type: ignore[arg-type]


@given(st.lists(_inputs, min_size=1, max_size=m.MAX_BATCH_ITEMS))
@settings(max_examples=50, deadline=None)
def test_run_batch_round_trips_and_joins_packed_inputs(inputs: list[dict[str, Any]]) -> None:
    msg = m.RunBatch(b"\x0a" * 32, tuple(inputs), _auth())
    body = m.encode_request(msg)
    assert body == msgpack.packb([m.RUN_BATCH, msg.model_id, inputs, m._auth_fields(msg.auth)], use_bin_type=True)
    assert m.encode_run_batch(msg.model_id, [m.pack_inputs(i) for i in inputs], msg.auth) == body
    assert m.decode_request(body) == msg


@given(st.lists(st.one_of(st.builds(m.ItemResult, st.text(max_size=20), _usage),
                          st.builds(m.ItemError, st.sampled_from(m.ERROR_CODES), st.text(max_size=40))),
                min_size=1, max_size=m.MAX_BATCH_ITEMS))
@settings(max_examples=50, deadline=None)
def test_batch_result_round_trips(items: list[m.ItemResult | m.ItemError]) -> None:
    charge = Charge(3, 5, 15, 14, b"\x03" * 32, 1)
    items = [dataclasses.replace(i, message=m._clip(i.message)) if isinstance(i, m.ItemError) else i for i in items]
    msg = m.BatchResult(b"\x0b" * 32, tuple(items), charge)
    assert m.decode_reply(m.encode_reply(msg)) == msg


def test_malformed_batches_are_refused_with_a_reason() -> None:
    model, auth = b"\x0a" * 32, m._auth_fields(_auth())
    bad_requests = [
        [m.RUN_BATCH, model, [], auth],  # no inputs
        [m.RUN_BATCH, model, [{}] * (m.MAX_BATCH_ITEMS + 1), auth],  # too many
        [m.RUN_BATCH, model, [{"text": "a"}, "not a map"], auth],
        [m.RUN_BATCH, b"\x07" * 32, [{"text": "a"}], auth],  # another model than the authorisation's
        [m.RUN_BATCH, model, [{"text": "a"}]],  # a field missing
        [m.RUN_BATCH, model, {"text": "a"}, auth],  # inputs not an array
    ]
    for request in bad_requests:
        with pytest.raises(m.TaskMessageError):
            m.decode_request(msgpack.packb(request, use_bin_type=True))
    charge = m._charge_fields(Charge(0, 0, 0, 0, b"\x03" * 32, 0))
    bad_replies = [
        [m.BATCH_RESULT, b"\x0b" * 32, [[2, "x", "y"]], charge],  # unknown item status
        [m.BATCH_RESULT, b"\x0b" * 32, [[True, "x", [1, 1, 1.0, 1, "cpu"]]], charge],  # a bool is no status
        [m.BATCH_RESULT, b"\x0b" * 32, [[0, "x"]], charge],  # item too short
        [m.BATCH_RESULT, b"\x0b" * 32, [[0, "x", [1, 1, -1.0, 1, "cpu"]]], charge],  # negative wall time
    ]
    for reply in bad_replies:
        with pytest.raises(m.TaskMessageError):
            m.decode_reply(msgpack.packb(reply, use_bin_type=True))


# ------------------------------------------------------------ runtime


async def test_run_many_batches_items_together_and_matches_single_runs(trained: Path) -> None:
    name = "opticks-classifier"
    spec = json.loads((trained / name / "spec.json").read_text())["architecture"]
    texts = [{"text": t} for t in ("Of the Colours", "thin Plates of Air", "the Rainbow", "Prisms and Rays")]
    config = dataclasses.replace(RuntimeConfig.for_tests(), max_batch_size=16, max_queue=6)
    async with open_runtime(config) as runtime:
        with trio.fail_after(30):
            await runtime.load(name, spec, trained / name)
            single = [await runtime.run(name, t) for t in texts]
            before = runtime.statistics().batches
            many = await runtime.run_many(name, texts)
            assert runtime.statistics().batches - before == 1  # one forward pass for the four
            for a, b in zip(single, many, strict=True):
                assert not isinstance(b, Exception)
                assert a.output.keys() == b.output.keys()  # type: ignore[union-attr]
                assert all(math.isclose(a.output[k], b.output[k], abs_tol=1e-6) for k in a.output)  # type: ignore[index, union-attr]
                assert b.usage.batch_size == 4
            with pytest.raises(RuntimeBusy):  # the queue (6) cannot take 7 at once: none is queued
                await runtime.run_many(name, texts + texts[:3])
            assert runtime.statistics().queue_length == 0


# ------------------------------------------------------------ the executor


def _signed_pay(payer: Node, executor: Node, task_id: bytes, charge: Charge) -> bytes:
    chain = payer.genesis.chain_id
    owed = expected_receipts(task_id, payer.key.account, executor.key.account, charge, chain)
    return m.encode_request(m.Pay(task_id, tuple(
        sign_receipt(payer.key.signing_key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount, chain_id=chain)
        for r in owed)))


async def test_a_batch_runs_what_fits_is_charged_for_it_and_settles(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        await connect_all(nodes)
        clf = await publish(bob, trained, "opticks-classifier")
        assert alice.agents is not None and bob.agents is not None and alice.chain is not None
        chain = alice.genesis.chain_id
        before = {n: balance(alice, nodes[n].key.account) for n in nodes}
        auth = sign_auth(alice.key, m.Authorisation(alice.key.account, bob.key.account, clf, os.urandom(32), chain,
                                                    10**18, int(time.time()) + 60))
        inputs = ({"text": "Of the Colours of thin Plates"}, {"prompt": "not a classifier input"},
                  {"text": "Of the Rainbow"})
        run = m.encode_request(m.RunBatch(clf, inputs, auth))
        result = await raw(alice, bob, run)
        assert isinstance(result, m.BatchResult) and result.task_id == auth.task_id
        ok0, bad, ok2 = result.items
        assert isinstance(bad, m.ItemError) and bad.code == "invalid_input" and bad.message
        assert isinstance(ok0, m.ItemResult) and isinstance(ok2, m.ItemResult)
        assert set(ok0.output) == set(ok2.output) and ok0.usage.batch_size == 2
        used = sum(i.usage.tokens_in + i.usage.tokens_out for i in (ok0, ok2))
        entry = await entry_of(alice, bob, clf)
        royalty = alice.agents.tasks.royalty
        assert result.charge == charge_for(used, entry.price_per_unit, auth.max_amount, royalty=royalty,
                                           payer=alice.key.account, executor=bob.key.account,
                                           publisher=entry.publisher)
        assert bob.agents.tasks.tasks_served == 2

        # The batch awaits its PAY: paying it on a new stream (one receipt, the executor is the
        # publisher here) settles exactly the batch's charge.
        paid = await raw(alice, bob, _signed_pay(alice, bob, auth.task_id, result.charge))
        assert isinstance(paid, m.Paid)
        await wait_settled(bob)
        assert bob.chain is not None
        await wait_height(alice, bob.chain.tip.height)
        assert balance(alice, alice.key.account) == before["alice"] - result.charge.amount
        assert balance(alice, bob.key.account) == before["bob"] + result.charge.amount


async def test_bad_batches_are_refused_whole_with_clear_codes(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        await connect_all(nodes)
        clf = await publish(bob, trained, "opticks-classifier")
        assert bob.agents is not None
        chain = alice.genesis.chain_id
        good = m.Authorisation(alice.key.account, bob.key.account, clf, os.urandom(32), chain, 10**18,
                               int(time.time()) + 60)
        inputs = ({"text": "Of the Colours"}, {"text": "Of Light"})
        forged = dataclasses.replace(sign_auth(alice.key, good), signature=bytes(64))
        cases = [
            (m.RunBatch(clf, inputs, forged), "bad_signature"),
            (m.RunBatch(clf, inputs, sign_auth(alice.key, dataclasses.replace(good, max_amount=1))), "price_too_low"),
            (m.RunBatch(clf, inputs, sign_auth(alice.key, dataclasses.replace(good, expiry=1))), "expired"),
        ]
        for request, code in cases:
            reply = await raw(alice, bob, m.encode_request(request))
            assert isinstance(reply, m.ErrorReply) and reply.code == code, (code, reply)
        malformed = await raw(alice, bob, msgpack.packb([m.RUN_BATCH, clf, [], m._auth_fields(good)]))
        assert isinstance(malformed, m.ErrorReply) and malformed.code == "malformed"
        assert bob.agents.tasks.tasks_served == 0

        # An oversized batch is refused before it is read, and the executor keeps serving.
        with trio.fail_after(10):
            stream = await alice.host.new_stream(bob.host.get_id(), [TASK])
            await stream.write(encode_uvarint(m.MAX_REQUEST + 1) + b"\x95\x05")
            reply = m.decode_reply(await read_frame(stream, m.MAX_REPLY))
            assert isinstance(reply, m.ErrorReply) and reply.code == "too_large"
            await stream.close()
        ok = await raw(alice, bob, m.encode_request(m.RunBatch(clf, inputs, sign_auth(alice.key, good))))
        assert isinstance(ok, m.BatchResult) and all(isinstance(i, m.ItemResult) for i in ok.items)


# ------------------------------------------------------------ the client


async def test_concurrent_requests_go_out_in_batches_paid_once_each(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        await connect_all(nodes)
        emb = await publish(carol, trained, "opticks-embedder")  # carol publishes; bob runs it
        await fetch(bob, emb)
        entry = await entry_of(alice, bob, emb)
        assert alice.agents is not None and bob.agents is not None and alice.chain is not None
        tasks = alice.agents.tasks
        before = {n: balance(alice, nodes[n].key.account) for n in nodes}
        texts = [f"Of the Colours of Light, observation {i}" for i in range(40)]
        outcomes: dict[int, Any] = {}

        async def one(i: int) -> None:
            outcomes[i] = await tasks.run_remote(bob.host.get_id(), entry, {"texts": [texts[i]]}, 10**15)

        with trio.fail_after(60):
            alone = await tasks.run_remote(bob.host.get_id(), entry, {"texts": [texts[0]]}, 10**15)
            assert alone.batch == 1  # nothing to wait with: a plain RUN
            async with trio.open_nursery() as nursery:
                for i in range(len(texts)):
                    nursery.start_soon(one, i)
        assert tasks.batches_sent >= 1 and tasks.batched_requests >= 2
        assert tasks.batches_sent + (len(texts) - tasks.batched_requests) < len(texts)  # fewer tasks than requests
        assert max(o.batch for o in outcomes.values()) > 1
        for a, b in zip(alone.output[0], outcomes[0].output[0], strict=True):
            assert math.isclose(a, b, abs_tol=1e-5)  # batched or not, the same vector
        assert bob.agents.tasks.tasks_served == len(texts) + 1

        # Every batch's receipts were signed once for the batch; together they pay exactly the
        # sum of the requests' own charges, and settle so.
        receipts = {r.receipt_id: r for o in [alone, *outcomes.values()] for r in o.receipts}
        total = sum(o.charge.amount for o in [alone, *outcomes.values()])
        assert sum(r.amount for r in receipts.values()) == total
        await wait_settled(bob, carol)
        assert bob.chain is not None and carol.chain is not None
        await wait_height(alice, max(bob.chain.tip.height, carol.chain.tip.height))
        assert balance(alice, alice.key.account) == before["alice"] - total
        gained = [balance(alice, nodes[n].key.account) - before[n] for n in ("bob", "carol")]
        assert sum(gained) == total and all(g > 0 for g in gained)
        assert all(alice.chain.state.is_settled(r.payer, r.receipt_id) for r in receipts.values())


# ------------------------------------------------------------ passages and the cache


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_passages(CORPUS)


@pytest.fixture(scope="module")
def index(corpus: list[str]) -> PassageIndex:
    return PassageIndex(corpus)


_WORDS = ["Light", "Colours", "Refraction", "thin", "Plates", "Rays", "Prism", "Bodies", "the", "and", "zzz", "42"]


@given(st.lists(st.sampled_from(_WORDS), max_size=6), st.integers(1, 20))
@settings(max_examples=60, deadline=None)
def test_the_passage_index_gives_what_a_full_scan_gives(corpus: list[str], index: PassageIndex, words: list[str],
                                                        limit: int) -> None:
    query = " ".join(words)
    assert index.candidates(query, limit) == candidate_passages(query, corpus, limit)
    assert index.candidates(query, limit) == candidate_passages(query, corpus, limit)  # memoised: the same


async def test_the_cache_sends_only_what_it_lacks_and_checks_what_comes_back() -> None:
    cache = EmbeddingCache(limit=3)
    mid = b"\x0a" * 32
    split = cache.split(mid, 2, ["q", "a", "b"])
    assert split.send == ["q", "a", "b"]
    assert await split.complete([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]) == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    split = cache.split(mid, 2, ["q2", "b", "c", "a"])
    assert split.send == ["q2", "c"]  # the query is always sent; a and b are known
    assert await split.complete([[0.1, 0.2], [0.3, 0.4]]) == [[0.1, 0.2], [0.5, 0.5], [0.3, 0.4], [0.0, 1.0]]
    assert cache.split(b"\x0b" * 32, 2, ["q", "a"]).send == ["q", "a"]  # another model: nothing known
    cache.flights.clear()
    for bad in ([[1.0, 0.0]], [[1.0, 0.0], [1.0]], [[1.0, 0.0], [math.nan, 0.0]], "x", [[1.0, 0.0], [1, 0]]):
        split = cache.split(mid, 2, ["q3", "d"])
        with pytest.raises(ValueError):
            await split.complete(bad)
        split.release()
        assert not cache.flights
    assert len(cache) == 3  # bounded


async def test_concurrent_queries_fetch_a_missing_passage_once() -> None:
    cache = EmbeddingCache()
    mid = b"\x0a" * 32
    first = cache.split(mid, 2, ["q1", "a", "b"])
    second = cache.split(mid, 2, ["q2", "b", "c"])
    assert first.send == ["q1", "a", "b"] and second.send == ["q2", "c"]  # b is on its way: not sent again
    assert second.cached == 1 and cache.shared == 1
    got: list[list[list[float]]] = []

    async def complete_second() -> None:
        got.append(await second.complete([[0.2, 0.2], [0.3, 0.3]]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(complete_second)
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # waits for b
            await first.complete([[0.1, 0.1], [0.4, 0.4], [0.5, 0.5]])
    assert got == [[[0.2, 0.2], [0.5, 0.5], [0.3, 0.3]]]
    assert not cache.flights
    # a request that fails: whoever waited on it fails this attempt, and the next one sends it
    third = cache.split(mid, 2, ["q3", "d"])
    fourth = cache.split(mid, 2, ["q4", "d"])
    assert fourth.send == ["q4"]
    third.release()
    with trio.fail_after(5), pytest.raises(VectorsUnavailable):
        await fourth.complete([[0.6, 0.6]])
    assert cache.split(mid, 2, ["q5", "d"]).send == ["q5", "d"]


async def test_a_cached_retrieval_answers_as_an_uncached_one(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        await connect_all(nodes)
        await publish(bob, trained, "opticks-embedder")
        assert alice.agents is not None
        query = "Of the Colours of thin transparent Plates"
        with trio.fail_after(60):
            first = (await alice.agents.pipeline.ask(query, 10**18)).to_dict()
            second = (await alice.agents.pipeline.ask(query, 10**18)).to_dict()
        r1 = next(r for r in first["trace"] if r["subtask"] == "retrieve")
        r2 = next(r for r in second["trace"] if r["subtask"] == "retrieve")
        assert r1["error"] is None and r2["error"] is None
        assert r1["cached"] == 0 and r2["cached"] > 0
        assert r2["units"] < r1["units"] and int(r2["cost"]) < int(r1["cost"])  # only the query was embedded
        assert first["answer"] == second["answer"] and "Nearest passage" in first["answer"]


def test_cosines_of_unit_vectors_match_the_definition_and_a_kept_vector_is_normalised_once() -> None:
    rng = random.Random(7)
    query = [rng.uniform(-1, 1) for _ in range(64)]
    vectors = [[rng.uniform(-1, 1) for _ in range(64)] for _ in range(15)] + [[0.0] * 64, list(query)]

    def cosine(a: list[float], b: list[float]) -> float:
        den = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b, strict=True)) / den if den else 0.0

    got = cosines(unit_vector(query), [unit_vector(v) for v in vectors])
    assert got == pytest.approx([cosine(query, v) for v in vectors], abs=1e-12)
    assert got[-2] == 0.0 and got[-1] == pytest.approx(1.0)
    assert cosines(unit_vector([0.0] * 64), [unit_vector(query)]) == [0.0]
    cache = EmbeddingCache(limit=1)
    mid = b"\x0a" * 32
    cache.put(mid, "a", vectors[0])
    first = cache.unit(mid, "a", vectors[0])
    assert first == unit_vector(vectors[0]) and cache.unit(mid, "a", vectors[0]) is first  # kept
    assert cache.unit(mid, "a", vectors[1]) == unit_vector(vectors[1])  # not the kept vector: its own
    cache.put(mid, "a", vectors[2])  # replaced: the old unit vector is not reused
    assert cache.unit(mid, "a", vectors[2]) == unit_vector(vectors[2])
    cache.put(mid, "b", vectors[3])  # evicts "a", and its unit vector
    assert cache._units.keys() <= {(mid, "b")}
