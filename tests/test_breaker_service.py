"""The breaker service on 8 real in-process nodes sharing one devnet genesis: votes just under
the halt threshold do not halt, reaching it halts on every node; unstaked, forged and replayed
votes injected by a raw gossipsub host are rejected (and the forger is cut off); a node that
was down during the vote learns of the halt by catch-up; a halt survives a restart; a resume
quorum lifts it. Every wait is on a condition under a timeout."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import nacl.signing
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from prsm_node.breaker import net
from prsm_node.breaker.service import TOPIC, BreakerService
from prsm_node.breaker.tally import ModelState
from prsm_node.breaker.votes import Action, Vote, encode_vote, sign_vote
from prsm_node.config import Config
from prsm_node.genesis import Validator, development_genesis
from prsm_node.home import Home, init_home
from prsm_node.host import build_host
from prsm_node.keys import NodeKey
from prsm_node.ledger.types import Stake
from prsm_node.node import Node

N = 8
# Total stake 900: the halt threshold (1/3) is exactly 300, the resume threshold (2/3) 600.
STAKES = [299, 1, 100, 100, 100, 100, 100, 100]
MODEL = bytes(range(32))
WAIT = 30


class Net:
    """Eight nodes, each in its own cancel scope so one can be stopped and started again."""

    def __init__(self, root: Path, nursery: trio.Nursery) -> None:
        self.root = root
        self.nursery = nursery
        self.nodes: list[Node] = []
        self.bootstrap: list[str] = []
        self.done: dict[int, trio.Event] = {}

    def home(self, i: int) -> Home:
        return Home(self.root / f"n{i}")

    async def start(self, i: int) -> Node:
        home = self.home(i)
        node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), list(self.bootstrap))
        done = self.done[i] = trio.Event()

        async def run(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await node.run(task_status=task_status)
            finally:
                done.set()

        ready = await self.nursery.start(run)
        self.bootstrap = self.bootstrap or [ready.addrs[0]]
        if i < len(self.nodes):
            self.nodes[i] = node
        else:
            self.nodes.append(node)
        return node

    async def stop(self, i: int) -> None:
        self.nodes[i].stop("test: stopped")
        with trio.fail_after(WAIT):
            await self.done[i].wait()

    def breaker(self, i: int) -> BreakerService:
        b = self.nodes[i].breaker
        assert b is not None
        return b


@asynccontextmanager
async def breaker_net(root: Path) -> AsyncIterator[Net]:
    keys = [NodeKey.generate() for _ in range(N)]
    genesis = development_genesis(
        "devnet", [Validator(account=keys[0].account.hex(), peer_id=str(keys[0].peer_id))],
        [k.account.hex() for k in keys],
    )
    for i, key in enumerate(keys):
        cfg = Config.for_tests()
        cfg.ledger.block_interval = 0.05
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


async def stake_everyone(net_: Net) -> None:
    heights = []
    for node, amount in zip(net_.nodes, STAKES, strict=True):
        assert node.chain_net is not None and node.chain is not None
        entry = await node.chain_net.submit(body=Stake(amount))
        with trio.fail_after(WAIT):
            heights.append((await node.chain.wait_committed(entry.hash)).height)
    for node in net_.nodes:
        assert node.chain is not None
        with trio.fail_after(WAIT):
            await node.chain.wait_height(max(heights))


async def wait_all(net_: Net, condition: Callable[[BreakerService], bool], nodes: list[int] | None = None) -> None:
    with trio.fail_after(WAIT):
        for i in nodes if nodes is not None else range(len(net_.nodes)):
            b = net_.breaker(i)
            await b.wait_until(lambda b=b: condition(b))  # type: ignore[misc]


async def wait_mesh(net_: Net) -> None:
    """Every node sees the others on the topic and has a mesh (the 1 s heartbeat builds it)."""
    for i in range(len(net_.nodes)):
        b = net_.breaker(i)
        with trio.fail_after(WAIT):
            while True:
                if b.topic_peers() >= 1 and b.mesh_peers() >= 1:
                    break
                await trio.sleep(0.05)  # gossipsub exposes no event for its mesh


async def test_threshold_faults_catchup_restart_and_resume(short_tmp: Path) -> None:
    async with breaker_net(short_tmp) as net_:
        await stake_everyone(net_)
        await wait_mesh(net_)

        # Just under the threshold (299 of 900): halted nowhere but self-halted on the voter.
        await net_.breaker(0).vote(MODEL, Action.HALT, "emits unsafe instructions")
        await wait_all(net_, lambda b: b.tally.last_epoch(net_.nodes[0].key.account, MODEL) == 1)
        assert net_.breaker(0).is_halted(MODEL)
        for i in range(1, N):
            assert not net_.breaker(i).is_halted(MODEL), i
            assert net_.breaker(i).tally.status(MODEL, net_.breaker(i)._stake_table()).halt_stake == 299

        # Node 7 is cut off during the vote.
        await net_.stop(7)

        # The 1-unit vote reaches exactly 300: halted on every running node.
        await net_.breaker(1).vote(MODEL, Action.HALT, "confirmed")
        await wait_all(net_, lambda b: b.is_halted(MODEL), list(range(7)))

        # Faults, injected from a raw host that speaks gossipsub on the topic.
        await inject_bad_votes(net_)

        # Node 7 comes back and learns of the halt by catch-up.
        await net_.start(7)
        await wait_all(net_, lambda b: b.is_halted(MODEL), [7])
        # (py-libp2p's gossipsub may also replay recent messages to a new peer; catch-up
        # serves the same votes, checked here directly.)
        served: list[Vote] = []
        await net.fetch_votes(net_.nodes[7].host, net_.nodes[0].host.get_id(), served.extend, MODEL)
        voters = {v.voter for v in served}
        assert {net_.nodes[0].key.account, net_.nodes[1].key.account} <= voters

        # A halt survives a restart: loaded from the store, before any peer is asked.
        await net_.stop(3)
        node3 = await net_.start(3)
        assert node3.breaker is not None and node3.breaker.is_halted(MODEL)

        # A resume quorum (600 of 900: six nodes of 100) lifts it everywhere, self-halts too.
        await wait_mesh(net_)
        for i in range(2, 8):
            await net_.breaker(i).vote(MODEL, Action.RESUME, "fixed upstream")
        await wait_all(net_, lambda b: not b.is_halted(MODEL))
        for i in range(N):
            assert not net_.breaker(i).tally.record(MODEL).self_halted

        # Stake alone moves a model: node 0's halt on another model is 299 of 900, under
        # the threshold; once it stakes 2 more (301 of 902, over 300.67) the block that
        # records that halts the model on every node, with no new vote.
        other = bytes(31) + b"\x02"
        await net_.breaker(0).vote(other, Action.HALT, "stake test")
        await wait_all(net_, lambda b: b.tally.last_epoch(net_.nodes[0].key.account, other) == 1)
        assert not any(net_.breaker(i).is_halted(other) for i in range(1, N))
        node0 = net_.nodes[0]
        assert node0.chain_net is not None and node0.chain is not None
        entry = await node0.chain_net.submit(body=Stake(2))
        with trio.fail_after(WAIT):
            await node0.chain.wait_committed(entry.hash)
        await wait_all(net_, lambda b: b.tally.state(other) is ModelState.HALTED)


async def inject_bad_votes(net_: Net) -> None:
    target = net_.breaker(2)
    chain_id = net_.nodes[0].genesis.chain_id
    now = int(time.time() * 1000)
    stranger = nacl.signing.SigningKey(b"\x42" * 32)
    unstaked = sign_vote(stranger, chain_id=chain_id, model=MODEL, action=Action.RESUME, epoch=1, timestamp_ms=now)
    staked_key = net_.nodes[4].key.signing_key
    real = sign_vote(staked_key, chain_id=chain_id, model=MODEL, action=Action.RESUME, epoch=7, timestamp_ms=now)
    forged = dataclasses.replace(real, signature=bytes(64))
    # node 0's own first vote (epoch 1) is already counted everywhere: a replay; so is an old epoch.
    replayed = sign_vote(
        net_.nodes[0].key.signing_key, chain_id=chain_id, model=MODEL, action=Action.RESUME, epoch=1,
        timestamp_ms=now, reason="an older epoch",
    )
    wrong_chain = sign_vote(staked_key, chain_id="prsm-elsewhere", model=MODEL, action=Action.RESUME, epoch=9,
                            timestamp_ms=now)
    other_forged = dataclasses.replace(real, epoch=8)  # signature no longer matches

    cfg = Config.for_tests()
    host = build_host(NodeKey.generate(), cfg)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        pubsub, router = net.build_pubsub(host, single_host=True)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()  # not subscribed: it publishes to its fanout
            target_id = net_.nodes[2].host.get_id()
            addr = f"{net_.nodes[2].host.get_addrs()[0]}"
            with trio.fail_after(WAIT):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                await pubsub.wait_for_peer(target_id, timeout=WAIT)
                await pubsub.wait_for_subscription(target_id, TOPIC, timeout=WAIT)
            before = dict(target.stats.rejected)

            def grew(code: str, by: int = 1) -> Callable[[], bool]:
                return lambda: target.stats.rejected[code] >= before.get(code, 0) + by

            for vote, code in [(unstaked, "unstaked"), (replayed, "replayed"), (forged, "bad_signature"),
                               (wrong_chain, "wrong_chain")]:
                await publish_raw(pubsub, vote)
                with trio.fail_after(WAIT):
                    await target.wait_until(grew(code))
            # A third peer-fault rejection blacklists and disconnects the forger.
            await publish_raw(pubsub, other_forged)
            with trio.fail_after(WAIT):
                await target.wait_until(grew("bad_signature", 2))
                await target.wait_until(lambda: target.stats.blacklisted >= 1)
    for i in range(7):
        b = net_.breaker(i)
        assert b.is_halted(MODEL)
        assert b.tally.last_epoch(net_.nodes[4].key.account, MODEL) is None  # nothing forged counted
        assert b.tally.last_epoch(stranger.verify_key.encode(), MODEL) is None


async def publish_raw(pubsub: object, vote: Vote) -> None:
    await pubsub.publish(TOPIC, encode_vote(vote))  # type: ignore[attr-defined]
