"""The breaker on 8 real in-process nodes, beyond gossip: validators record votes in the
ledger (consensus-ordered history on every node, duplicates harmless); anti-entropy delivers a
vote that gossip never carried; per-voter vote limits stop a flood at the gossip validator and
cut off a relay that does not enforce them. Every wait is on a condition under a timeout."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from prsm_node.breaker import net
from prsm_node.breaker.control import BreakerMethods
from prsm_node.breaker.exceptions import RateLimited
from prsm_node.breaker.messages import Votes, catchup_order, encode_message
from prsm_node.breaker.params import MAX_WINDOW_MS
from prsm_node.breaker.service import TOPIC
from prsm_node.breaker.votes import Action, encode_vote, sign_vote
from prsm_node.config import Config
from prsm_node.genesis import Validator, development_genesis
from prsm_node.home import Home, init_home
from prsm_node.host import build_host
from prsm_node.keys import NodeKey
from prsm_node.ledger.exceptions import DuplicateTx, StaleVote
from prsm_node.ledger.types import BreakerVote
from prsm_node.wire import read_frame, write_frame

from .test_breaker_service import WAIT, N, Net, stake_everyone, wait_all, wait_mesh

MODEL = bytes(range(32))
OTHER = bytes(range(1, 33))
THIRD = bytes(range(2, 34))


@asynccontextmanager
async def breaker_net(root: Path, params: dict[str, Any] | None = None) -> AsyncIterator[Net]:
    keys = [NodeKey.generate() for _ in range(N)]
    genesis = development_genesis(
        "devnet", [Validator(account=keys[0].account.hex(), peer_id=str(keys[0].peer_id))],
        [k.account.hex() for k in keys],
    )
    genesis.params.update(params or {})
    for i, key in enumerate(keys):
        cfg = Config.for_tests()
        cfg.ledger.block_interval = 0.05
        cfg.breaker.sync_idle_interval = 1.0  # no back-off: the test waits on anti-entropy
        init_home(Home(root / f"n{i}"), cfg=cfg, genesis=genesis, key=key)
    async with trio.open_nursery() as nursery:
        net_ = Net(root, nursery)
        try:
            for i in range(N):
                await net_.start(i)
            yield net_
        finally:
            for node in net_.nodes:
                node.stop("test finished")


async def wait_ledger(net_: Net, condition: Callable[[Any], bool]) -> None:
    """Until ``condition(chain)`` holds on every node (re-checked after each block)."""
    with trio.fail_after(WAIT):
        for node in net_.nodes:
            chain = node.chain
            assert chain is not None
            while not condition(chain):
                await chain.wait_height(chain.tip.height + 1)


async def test_votes_recorded_in_the_ledger_and_repaired_by_anti_entropy(short_tmp: Path) -> None:
    async with breaker_net(short_tmp) as net_:
        await stake_everyone(net_)
        await wait_mesh(net_)
        accounts = [n.key.account for n in net_.nodes]

        # Two gossiped votes: node 0 (the validator) records both; every node's ledger has them.
        await net_.breaker(1).vote(MODEL, Action.HALT, "leaks training data")
        await net_.breaker(2).vote(MODEL, Action.HALT, "confirmed")
        await wait_ledger(net_, lambda c: all(c.committed_vote_record(MODEL, a) for a in accounts[1:3]))
        heights = {n.chain.state.vote_record(MODEL, accounts[1]).height for n in net_.nodes}  # type: ignore[union-attr]
        assert len(heights) == 1  # one consensus order
        tip = net_.nodes[0].chain.tip.height  # type: ignore[union-attr]
        hashes = {n.chain.state.state_hash() for n in net_.nodes if n.chain.tip.height == tip}  # type: ignore[union-attr]
        assert len(hashes) == 1

        # The history, from a follower's ledger, in block order, with the submitting validator.
        # The two votes race through gossip to the validator, so either may be recorded first;
        # what is fixed is that the history follows the ledger's order.
        history = await BreakerMethods(net_.breaker(6)).history({"model": MODEL.hex()})
        assert sorted(v["voter"] for v in history["votes"]) == sorted([accounts[1].hex(), accounts[2].hex()])
        places = [(v["height"], v["index"]) for v in history["votes"]]
        assert places == sorted(places)
        for v in history["votes"]:
            assert net_.nodes[6].chain.state.vote_record(MODEL, bytes.fromhex(v["voter"])).height == v["height"]  # type: ignore[union-attr]
        assert all(v["submitter"] == accounts[0].hex() and v["height"] >= 1 for v in history["votes"])
        status = await BreakerMethods(net_.breaker(6)).status({"model": MODEL.hex()})
        assert all(v["recorded"] is not None for v in status["voters"])

        # A second submission of a recorded vote (another node acting as a validator would):
        # refused by the mempool, or left out of the block as stale; nothing changes.
        vote = next(v for v in net_.breaker(0).tally.votes(MODEL) if v.voter == accounts[1])
        node3 = net_.nodes[3]
        assert node3.chain_net is not None and node3.chain is not None
        with pytest.raises((StaleVote, DuplicateTx)):
            await node3.chain_net.submit(body=BreakerVote(vote))

        # A vote gossip never carried (counted on node 5 only): anti-entropy spreads it.
        chain_id = net_.nodes[0].genesis.chain_id
        silent = sign_vote(net_.nodes[4].key.signing_key, chain_id=chain_id, model=OTHER, action=Action.HALT,
                           epoch=1, timestamp_ms=int(time.time() * 1000) - 5000, reason="never gossiped")
        def exchanged(i: int) -> int:
            return net_.breaker(i).stats.repaired + net_.breaker(i).stats.caught_up

        before = [exchanged(i) for i in range(N)]
        net_.breaker(5).accept(silent, max_age_ms=None)
        await wait_all(net_, lambda b: b.tally.last_epoch(accounts[4], OTHER) == 1)
        # every other node counted it from an exchange (anti-entropy, or a catch-up that came
        # first), not from gossip, which never carried it
        assert sum(exchanged(i) - before[i] for i in range(N)) >= N - 1
        assert sum(net_.breaker(i).stats.repaired for i in range(N)) >= 1
        await wait_ledger(net_, lambda c: c.committed_vote_record(OTHER, accounts[4]) is not None)

        # The ledger state survives a restart of a follower (loaded and hash-checked).
        await net_.stop(6)
        node6 = await net_.start(6)
        assert node6.chain is not None and node6.chain.state.vote_record(MODEL, accounts[2]) is not None

        # A peer that resets the stream after the first page of a catch-up: the votes of that
        # page are counted all the same (each checked), not thrown away with the exchange.
        now = int(time.time() * 1000)
        page = tuple(catchup_order(
            sign_vote(net_.nodes[i].key.signing_key, chain_id=chain_id, model=THIRD, action=Action.HALT,
                      epoch=1, timestamp_ms=now - 1000 + i, reason="first page")
            for i in (5, 6, 7)
        ))

        async def one_page_then_reset(stream: Any) -> None:
            await read_frame(stream, 4096)
            await write_frame(stream, encode_message(Votes(page, more=True)))
            await stream.reset()

        host = build_host(NodeKey.generate(), Config.for_tests())
        host.set_stream_handler(net.CATCHUP, one_page_then_reset)
        target = net_.breaker(3)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(WAIT):
                await target.host.connect(info_from_p2p_addr(
                    multiaddr.Multiaddr(f"{host.get_addrs()[0]}")))
                await target.catch_up(host.get_id())
        assert [target.tally.last_epoch(accounts[i], THIRD) for i in (5, 6, 7)] == [1, 1, 1]
        assert target.stats.catchup_errors >= 1


def seen(b: Any) -> int:
    """Votes ``b`` has judged: counted or rejected."""
    return int(b.stats.accepted + sum(b.stats.rejected.values()))


async def test_vote_limits_stop_a_flood(short_tmp: Path) -> None:
    # Windows are fixed slices of the clock; a week-long one makes it vanishingly unlikely
    # that the test straddles a boundary (which would reset the limits mid-test).
    params = {
        "breaker_max_votes_per_model": 2,
        "breaker_max_models_per_voter": 3,
        "breaker_vote_window_ms": MAX_WINDOW_MS,
    }
    async with breaker_net(short_tmp, params) as net_:
        await stake_everyone(net_)
        await wait_mesh(net_)
        b1 = net_.breaker(1)
        models = [bytes([m]) * 32 for m in range(1, 6)]

        # Own votes: two per model, three models per window; the next is refused locally.
        await b1.vote(models[0], Action.HALT, "a")
        await b1.vote(models[0], Action.RESUME, "b")
        with pytest.raises(RateLimited):
            await b1.vote(models[0], Action.HALT, "c")
        await b1.vote(models[1], Action.HALT, "d")
        await b1.vote(models[2], Action.HALT, "e")
        with pytest.raises(RateLimited):
            await b1.vote(models[3], Action.HALT, "f")
        voter = net_.nodes[1].key.account
        await wait_all(net_, lambda b: all(b.tally.last_epoch(voter, m) for m in models[:3]))

        # A flood from a raw gossipsub host that signs with a staked key (node 4's) and does
        # not apply the limits: node 2 counts 2 votes per model and 3 models, rejects the rest
        # as rate_limited without forwarding it, and cuts the relay off.
        target = net_.breaker(2)
        key = net_.nodes[4].key.signing_key
        flooder = net_.nodes[4].key.account
        chain_id = net_.nodes[0].genesis.chain_id
        now = int(time.time() * 1000)
        flood = [
            sign_vote(key, chain_id=chain_id, model=models[m], action=Action.HALT, epoch=e, timestamp_ms=now + e)
            for m in range(2)
            for e in range(1, 7)
        ]
        cfg = Config.for_tests()
        host = build_host(NodeKey.generate(), cfg)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            pubsub, router = net.build_pubsub(host, single_host=True)
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                target_id = net_.nodes[2].host.get_id()
                with trio.fail_after(WAIT):
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(str(target.host.get_addrs()[0]))))
                    await pubsub.wait_for_peer(target_id, timeout=WAIT)
                    await pubsub.wait_for_subscription(target_id, TOPIC, timeout=WAIT)
                # One at a time, each after node 2 has judged the one before (or cut the flooder
                # off): py-libp2p validates the messages of one RPC in tasks of their own, which
                # trio may run in reverse; epoch 6 judged first would make epochs 1..5 replays.
                for vote in flood:
                    judged = seen(target)
                    await pubsub.publish(TOPIC, encode_vote(vote))
                    with trio.fail_after(WAIT):
                        await target.wait_until(
                            lambda judged=judged: seen(target) > judged or target.stats.blacklisted > 0  # type: ignore[misc]
                        )
                assert target.stats.blacklisted == 1
        assert target.stats.rejected["rate_limited"] >= 4
        # What node 2 counted and relayed: epochs 1 and 2 of each model, never more; every
        # node ends there.
        assert [target.tally.last_epoch(flooder, m) for m in models[:2]] == [2, 2]
        await wait_all(net_, lambda b: [b.tally.last_epoch(flooder, m) for m in models[:2]] == [2, 2])
        for i in range(N):
            assert net_.breaker(i).stats.accepted <= 5 + 4  # node 1's five and the flood's four
