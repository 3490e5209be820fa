"""``/prsm/tx/1.0.0`` and ``/prsm/sync/1.0.0`` between real hosts on 127.0.0.1: a peer's
bad bytes, bad signatures, wrong chains, overflowing amounts and unknown kinds each get a
clear error code, and the node goes on serving."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import msgpack
import nacl.signing
import pytest
import trio
import trio.testing
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from prsm_node.chain import messages as m
from prsm_node.chain.net import SYNC, TX
from prsm_node.config import Config
from prsm_node.ledger import Transfer, encode_tx, sign_tx
from prsm_node.ledger.codec import tx_hash
from prsm_node.node import Node
from prsm_node.wire import FrameError, encode_uvarint, read_frame, write_frame

from .conftest import running_nodes
from .test_agents_task import agent_network

STRANGER = nacl.signing.SigningKey(b"\x42" * 32)


async def ask(client: Node, server: Node, protocol: object, body: bytes, limit: int = m.MAX_REPLY) -> bytes:
    with trio.fail_after(10):
        stream = await client.host.new_stream(server.host.get_id(), [protocol])  # type: ignore[list-item]
        try:
            await write_frame(stream, body)
            return await read_frame(stream, limit)
        finally:
            await stream.close()


def tx_fields(tx_bytes: bytes) -> list[object]:
    return msgpack.unpackb(tx_bytes)


async def test_tx_protocol_rejects_bad_input_clearly_and_accepts_a_good_tx(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        chain = alice.genesis.chain_id
        owner = alice.key.signing_key  # alice's dev genesis funds alice's own account
        good = sign_tx(owner, chain_id=chain, nonce=0, fee=0, body=Transfer(b"\x01" * 32, 10**18))
        fields = tx_fields(encode_tx(good))

        forged = msgpack.packb([*fields[:5], bytes(64)])
        overflow = msgpack.packb([*fields[:4], [1, b"\x01" * 32, b"\x01" + b"\x00" * 16], fields[5]])
        negative = msgpack.packb([*fields[:4], [1, b"\x01" * 32, -5], fields[5]])
        unknown = msgpack.packb([*fields[:4], [9, b"\x00"], fields[5]])
        other_chain = encode_tx(
            sign_tx(owner, chain_id="prsm-elsewhere", nonce=0, fee=0, body=Transfer(b"\x01" * 32, 1))
        )
        stranger = encode_tx(sign_tx(STRANGER, chain_id=chain, nonce=0, fee=0, body=Transfer(b"\x01" * 32, 1)))
        cases = [
            (b"\xc1junk", "malformed"),
            (msgpack.packb([7, b""]), "malformed"),
            (m.encode_submit(b"not a tx"), "malformed"),
            (m.encode_submit(forged), "bad_signature"),
            (m.encode_submit(overflow), "malformed"),
            (m.encode_submit(negative), "malformed"),
            (m.encode_submit(unknown), "unknown_kind"),
            (m.encode_submit(other_chain), "wrong_chain"),
            (m.encode_submit(stranger), "insufficient_funds"),
        ]
        for body, code in cases:
            reply = m.decode_submit_reply(await ask(bob, alice, TX, body))
            assert isinstance(reply, m.ErrorReply) and reply.code == code, (body[:40], reply)
            assert reply.message

        # An oversized frame is refused before it is read; the node serves the next stream.
        with trio.fail_after(10):
            stream = await bob.host.new_stream(alice.host.get_id(), [TX])
            await stream.write(encode_uvarint(m.MAX_TX_REQUESTS + 1) + b"\x00" * 100)
            with pytest.raises((StreamReset, StreamEOF, FrameError)):
                await read_frame(stream, m.MAX_REPLY)

        # A good tx is accepted, committed, and confirmed over WAIT; its replay is refused.
        accepted = m.decode_submit_reply(await ask(bob, alice, TX, m.encode_submit(encode_tx(good))))
        assert accepted == tx_hash(good)
        committed = m.decode_wait_reply(await ask(bob, alice, TX, m.encode_wait(tx_hash(good), 10_000)))
        assert not isinstance(committed, m.ErrorReply)
        assert committed[0] == tx_hash(good) and committed[1] == 1
        again = m.decode_submit_reply(await ask(bob, alice, TX, m.encode_submit(encode_tx(good))))
        assert isinstance(again, m.ErrorReply) and again.code == "bad_nonce"
        unknown_wait = m.decode_wait_reply(await ask(bob, alice, TX, m.encode_wait(b"\x00" * 32, 10)))
        assert isinstance(unknown_wait, m.ErrorReply) and unknown_wait.code == "not_found"

        # Sync: the block comes with its certificate; bad requests get clear errors.
        reply = m.decode_blocks_reply(await ask(bob, alice, SYNC, m.encode_get_blocks(1, 8, 0), m.MAX_SYNC_REPLY))
        assert not isinstance(reply, m.ErrorReply)
        tip, blocks = reply
        assert tip == 1 and len(blocks) == 1
        for body, code in [(m.encode_get_blocks(0, 1, 0), "bad_request"), (b"\x93\x01", "malformed")]:
            err = m.decode_blocks_reply(await ask(bob, alice, SYNC, body, m.MAX_SYNC_REPLY))
            assert isinstance(err, m.ErrorReply) and err.code == code
        assert alice.chain is not None and alice.chain.tip.height == 1
        assert (await alice._status({}))["height"] == 1


async def test_submit_many_answers_each_tx_and_refuses_a_bad_batch(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        chain = alice.genesis.chain_id
        owner = alice.key.signing_key
        good = [
            encode_tx(sign_tx(owner, chain_id=chain, nonce=n, fee=0, body=Transfer(b"\x01" * 32, 10**18)))
            for n in range(3)
        ]
        forged = msgpack.packb([*tx_fields(good[1])[:5], bytes(64)])
        gap = encode_tx(sign_tx(owner, chain_id=chain, nonce=7, fee=0, body=Transfer(b"\x01" * 32, 1)))
        batch = [good[0], b"junk", good[0], forged, good[1], good[2], gap]
        reply = m.decode_submit_many_reply(await ask(bob, alice, TX, m.encode_submit_many(batch), m.MAX_MANY_REPLY), 7)
        assert reply == [None, "malformed", "duplicate", "bad_signature", None, None, "bad_nonce"]
        assert alice.chain is not None
        for tx in good:
            assert alice.chain.mempool.get(hashlib.sha256(tx).digest()) is not None or alice.chain.locate(
                hashlib.sha256(tx).digest()
            )

        # An empty or oversized batch is malformed as a whole; the node serves the next stream.
        for body in (m.encode_submit_many([]), m.encode_submit_many([good[0]] * (m.MAX_SUBMIT_MANY + 1))):
            err = m.decode_submit_many_reply(await ask(bob, alice, TX, body, m.MAX_MANY_REPLY), 0)
            assert isinstance(err, m.ErrorReply) and err.code == "malformed"
        with trio.fail_after(10):
            await alice.chain.wait_height(1)

        # The control method: the same answers, per tx, as hashes or codes.
        methods = alice.control._methods
        out = await methods["ledger.submit_many"]({"txs": [good[0].hex(), "zz", gap.hex()]})
        assert out["accepted"] == 0
        assert [r.get("code") for r in out["results"]] == ["bad_nonce", "invalid_params", "bad_nonce"]
        with pytest.raises(Exception, match="1..1024"):
            await methods["ledger.submit_many"]({"txs": []})



def _small_mempool(name: str, cfg: Config) -> None:
    cfg.ledger.mempool_size = 8
    cfg.ledger.block_interval = 3.0
    cfg.ledger.rebroadcast_interval = 60.0


async def test_txs_a_validator_turns_away_for_load_are_forwarded_again_after_its_next_block(short_tmp: Path) -> None:
    # alice (the solo validator) holds 8 pending txs at most and makes a block at most every
    # 3 s; bob forwards 8 txs while her mempool is full. They must commit well before bob's
    # rebroadcast (60 s) would send them again: bob's link retries after alice's next block.
    async with agent_network(short_tmp, ["alice", "bob"], _small_mempool) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        assert alice.chain is not None and alice.chain_net is not None and bob.chain_net is not None
        chain = alice.genesis.chain_id
        mine, yours = alice.key.signing_key, bob.key.signing_key
        first = sign_tx(mine, chain_id=chain, nonce=0, fee=0, body=Transfer(b"\x01" * 32, 1))
        with trio.fail_after(20):
            await alice.chain_net.submit(first)
            await alice.chain.wait_committed(tx_hash(first))
        # alice's next block is ~3 s away: fill her mempool, then bob's txs arrive
        own = [sign_tx(mine, chain_id=chain, nonce=n, fee=0, body=Transfer(b"\x01" * 32, 1)) for n in range(1, 9)]
        assert all(not isinstance(r, Exception) for r in await alice.chain.submit_many(own))
        theirs = [sign_tx(yours, chain_id=chain, nonce=n, fee=0, body=Transfer(b"\x02" * 32, 1)) for n in range(8)]
        assert all(not isinstance(r, Exception) for r in await bob.chain_net.submit_many(theirs))
        with trio.fail_after(30):
            for tx in theirs:
                await alice.chain.wait_committed(tx_hash(tx))
        assert bob.chain_net.statistics()["txs_retried"] >= 1


async def test_ledger_readers_wait_for_a_block_that_is_applied_but_not_yet_written(short_tmp: Path) -> None:
    # A block is applied in memory, then written (synced) in a thread, then becomes the tip.
    # While its write is held back here, ledger.balance and ledger.status must not report it.
    async with running_nodes(short_tmp, ["alice"]) as nodes:
        alice = nodes["alice"]
        assert alice.chain is not None and alice.chain_net is not None
        ledger = alice.chain.ledger
        real_commit = ledger.commit
        release = threading.Event()
        writing = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def held_commit(*args: object) -> None:
            trio.from_thread.run_sync(writing.set, trio_token=token)
            release.wait(30)
            real_commit(*args)  # type: ignore[arg-type]

        ledger.commit = held_commit  # type: ignore[method-assign]
        owner = alice.key.signing_key
        to = b"\x07" * 32
        tx = sign_tx(owner, chain_id=alice.genesis.chain_id, nonce=0, fee=0, body=Transfer(to, 5))
        methods = alice.control._methods
        seen: dict[str, object] = {}

        async def read(name: str, params: dict[str, object]) -> None:
            seen[name] = await methods[name](params)

        with trio.fail_after(20):
            await alice.chain_net.submit(tx)
            await writing.wait()  # the block is applied, its write is held
            assert alice.chain.state.account(to).balance == 5
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "ledger.balance", {"account": to.hex()})
                nursery.start_soon(read, "ledger.status", {})
                await trio.testing.wait_all_tasks_blocked()
                assert not seen  # both wait for the write
                release.set()
        assert seen["ledger.balance"]["balance"]["units"] == "5"  # type: ignore[index]
        assert seen["ledger.status"]["height"] == 1  # type: ignore[index]
        assert seen["ledger.status"]["state_hash"] == alice.chain.ledger.block(1).header.state_hash.hex()  # type: ignore[index]
