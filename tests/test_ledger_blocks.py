"""Blocks and their storage: codec, make/apply, certificates, LevelDB commit and load, replay,
independent stores reaching the same state hash, and a corrupt or foreign database refused."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prsm_node.exceptions import StoreError
from prsm_node.genesis import Genesis
from prsm_node.ledger import LedgerState, Stake, Transfer, Unstake, sign_tx, tx_hash
from prsm_node.ledger.block import (
    ZERO_HASH,
    Block,
    BlockRejected,
    Certificate,
    apply_block,
    decode_block,
    decode_certificate,
    decode_stored_block,
    encode_block,
    encode_certificate,
    make_block,
    sign_commit,
    tx_root,
    verify_certificate,
)
from prsm_node.ledger.exceptions import LedgerDecodeError
from prsm_node.ledger.storage import LedgerStore, TxLocation
from prsm_node.ledger.types import Tx
from prsm_node.store import Store

KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(4)]
ACCTS = [bytes(k.verify_key) for k in KEYS]
VALIDATOR = nacl.signing.SigningKey(b"\x55" * 32)
PROPOSER = bytes(VALIDATOR.verify_key)


def genesis(chain: str = "prsm-test-blocks") -> Genesis:
    return Genesis(
        chain_id=chain,
        network="test",
        genesis_time=0,
        balances={a.hex(): str(10**21) for a in ACCTS},
        params={"unbonding_blocks": 2},
    )


def transfer(i: int, to: int, amount: int, nonce: int, chain: str = "prsm-test-blocks", fee: int = 0) -> Tx:
    return sign_tx(KEYS[i], chain_id=chain, nonce=nonce, fee=fee, body=Transfer(ACCTS[to], amount))


def build_chain(state: LedgerState, batches: list[list[Tx]]) -> list[tuple[Block, list[Tx]]]:
    out = []
    prev, t = ZERO_HASH, 1000
    for txs in batches:
        block, included, _ = make_block(state, txs, proposer=PROPOSER, prev_hash=prev, time_ms=t)
        state.checkpoint()
        out.append((block, included))
        prev, t = block.hash(), t + 1
    return out


# ------------------------------------------------------------ codec


def test_block_round_trip_and_hash_binds_header() -> None:
    state = LedgerState.from_genesis(genesis())
    [(block, txs)] = build_chain(state, [[transfer(0, 1, 5, 0), transfer(1, 2, 7, 0)]])
    data = encode_block(block)
    again, decoded = decode_block(data)
    assert again == block and decoded == txs and again.hash() == block.hash()
    other = dataclasses.replace(block.header, time_ms=block.header.time_ms + 1)
    assert other.hash() != block.hash()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: [f[0], f[1][::-1]], "tx_root"),
        (lambda f: [[*f[0][:6], 5, f[0][7]], f[1]], "counts"),
        (lambda f: [f[0][:7], f[1]], "array of 8"),
        (lambda f: [f[0], [*f[1], b"junk"]], "block tx 2"),
        (lambda f: [f[0], f[1], 1], "array of 2"),
    ],
)
def test_decode_block_rejects(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    state = LedgerState.from_genesis(genesis())
    [(block, _)] = build_chain(state, [[transfer(0, 1, 5, 0), transfer(1, 2, 7, 0)]])
    fields = msgpack.unpackb(encode_block(block))
    with pytest.raises(LedgerDecodeError, match=message):
        decode_block(msgpack.packb(mutate(fields)))


def test_a_stored_block_is_read_without_decoding_each_tx_but_its_root_still_binds_them() -> None:
    state = LedgerState.from_genesis(genesis())
    [(block, _)] = build_chain(state, [[transfer(0, 1, 5, 0), transfer(1, 2, 7, 0)]])
    assert decode_stored_block(encode_block(block)) == block
    # bytes no tx decodes from, under a matching root: only the full decode looks inside
    junk = [b"junk", b"\xc1"]
    header = dataclasses.replace(block.header, tx_root=tx_root([hashlib.sha256(t).digest() for t in junk]))
    odd = encode_block(Block(header, tuple(junk)))
    assert decode_stored_block(odd).txs == tuple(junk)
    with pytest.raises(LedgerDecodeError, match="block tx 0"):
        decode_block(odd)
    fields = msgpack.unpackb(encode_block(block))
    reordered = [fields[0], fields[1][::-1]]
    miscounted = [[*fields[0][:6], 5, fields[0][7]], fields[1]]
    for changed, message in [(reordered, "tx_root"), (miscounted, "counts")]:
        with pytest.raises(LedgerDecodeError, match=message):
            decode_stored_block(msgpack.packb(changed))


def test_decode_block_rejects_junk_and_non_canonical() -> None:
    for junk in (b"", b"\xc1", b"\x92", msgpack.packb({"a": 1}), b"\xff" * 100):
        with pytest.raises(LedgerDecodeError):
            decode_block(junk)
    state = LedgerState.from_genesis(genesis())
    [(block, _)] = build_chain(state, [[]])
    data = encode_block(block)
    # The same array with a 16-bit array header: same values, not canonical.
    with pytest.raises(LedgerDecodeError, match="canonical"):
        decode_block(b"\xdc\x00\x02" + data[1:])


# ------------------------------------------------------------ apply


def test_apply_block_reaches_the_same_state_and_rejects_tampering() -> None:
    producer = LedgerState.from_genesis(genesis())
    batches = [[transfer(0, 1, 5, 0)], [transfer(0, 2, 1, 1), transfer(3, 0, 9, 0)], []]
    chain = build_chain(producer, batches)
    follower = LedgerState.from_genesis(genesis())
    prev, prev_t = ZERO_HASH, 0
    for block, txs in chain:
        apply_block(follower, block, txs, prev_hash=prev, prev_time_ms=prev_t)
        follower.checkpoint()
        prev, prev_t = block.hash(), block.header.time_ms
    assert follower.state_hash() == producer.state_hash()

    # A block that commits another state hash, one on the wrong parent, one with an invalid
    # tx: each rejected, the follower unchanged.
    before = follower.state_hash()
    more = LedgerState.from_genesis(genesis())
    build_chain(more, batches)
    [(nxt, txs)] = [
        (b, t)
        for b, t in [
            make_block(more, [transfer(1, 0, 3, 1)], proposer=PROPOSER, prev_hash=prev, time_ms=prev_t)[:2]
        ]
    ]
    lying = Block(dataclasses.replace(nxt.header, state_hash=b"\x01" * 32), nxt.txs)
    with pytest.raises(BlockRejected, match="commits state"):
        apply_block(follower, lying, txs, prev_hash=prev, prev_time_ms=prev_t)
    with pytest.raises(BlockRejected, match="does not extend"):
        apply_block(follower, nxt, txs, prev_hash=b"\x02" * 32, prev_time_ms=prev_t)
    replayed = [transfer(0, 1, 5, 0)]  # nonce 0 of account 0 was used in block 1
    with pytest.raises(BlockRejected, match="nonce"):
        apply_block(follower, nxt, replayed, prev_hash=prev, prev_time_ms=prev_t)
    assert follower.state_hash() == before and follower.height == 3
    apply_block(follower, nxt, txs, prev_hash=prev, prev_time_ms=prev_t)
    assert follower.state_hash() == more.state_hash()


def test_make_block_leaves_out_what_does_not_apply() -> None:
    state = LedgerState.from_genesis(genesis())
    txs = [transfer(0, 1, 5, 0), transfer(0, 1, 5, 0), transfer(1, 0, 10**30, 0), transfer(2, 3, 1, 0)]
    block, included, dropped = make_block(state, txs, proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=1)
    assert [tx_hash(t) for t in included] == [tx_hash(txs[0]), tx_hash(txs[3])]
    assert [type(e).__name__ for _, e in dropped] == ["BadNonce", "InsufficientFunds"]
    assert block.header.tx_count == 2


# ------------------------------------------------------------ certificates


def test_certificate_needs_a_quorum_of_distinct_validators() -> None:
    state = LedgerState.from_genesis(genesis())
    [(block, _)] = build_chain(state, [[transfer(0, 1, 5, 0)]])
    vals = [nacl.signing.SigningKey(bytes([0x60 + i]) * 32) for i in range(4)]
    accounts = frozenset(bytes(v.verify_key) for v in vals)
    sigs = sorted(sign_commit(v, block) for v in vals[:3])
    cert = Certificate(tuple(sigs))
    assert decode_certificate(encode_certificate(cert)) == cert
    verify_certificate(cert, block, accounts, 3)
    with pytest.raises(BlockRejected, match="2 valid"):
        verify_certificate(Certificate(tuple(sigs[:2])), block, accounts, 3)
    outsider = sign_commit(VALIDATOR, block)
    with pytest.raises(BlockRejected):
        verify_certificate(Certificate(tuple(sorted([*sigs[:2], outsider]))), block, accounts, 3)
    forged = (sigs[2][0], bytes(64))
    with pytest.raises(BlockRejected):
        verify_certificate(Certificate((*sigs[:2], forged)), block, accounts, 3)
    other = build_chain(LedgerState.from_genesis(genesis()), [[transfer(1, 0, 5, 0)]])[0][0]
    with pytest.raises(BlockRejected):
        verify_certificate(cert, other, accounts, 3)
    with pytest.raises(LedgerDecodeError, match="unique"):
        decode_certificate(encode_certificate(Certificate((sigs[0], sigs[0]))))


# ------------------------------------------------------------ storage


def open_store(path: Path, gen: Genesis) -> tuple[Store, LedgerStore]:
    store = Store(path)
    store.open()
    return store, LedgerStore(store.namespace("ledger"), gen)


def commit_chain(ledger: LedgerStore, state: LedgerState, batches: list[list[Tx]], tip: bytes = ZERO_HASH) -> bytes:
    for txs in batches:
        block, included, _ = make_block(state, txs, proposer=PROPOSER, prev_hash=tip, time_ms=state.height)
        ledger.commit(block, Certificate((sign_commit(VALIDATOR, block),)), included, state.changes())
        state.checkpoint()
        tip = block.hash()
    return tip


def test_store_commit_load_replay_history(tmp_path: Path) -> None:
    gen = genesis()
    store, ledger = open_store(tmp_path / "db", gen)
    state, tip = ledger.load()
    assert tip.height == 0
    batches = [
        [transfer(0, 1, 5, 0), transfer(1, 2, 7, 0)],
        [sign_tx(KEYS[0], chain_id=gen.chain_id, nonce=1, fee=3, body=Stake(100))],
        [sign_tx(KEYS[0], chain_id=gen.chain_id, nonce=2, fee=0, body=Unstake(40)), transfer(2, 0, 1, 0)],
        [],
        [],
    ]
    commit_chain(ledger, state, batches)
    expected = state.state_hash()
    store.close()

    store, ledger = open_store(tmp_path / "db", gen)
    loaded, tip = ledger.load()
    assert (tip.height, loaded.state_hash()) == (5, expected)
    assert loaded.account(ACCTS[0]) == state.account(ACCTS[0])
    assert loaded.account(ACCTS[0]).unbonding == ()  # released at height 3 + 2
    assert ledger.replay().state_hash() == expected
    history = list(ledger.history(ACCTS[0], limit=10))
    assert [(w.height, w.index) for w, _ in history] == [(3, 1), (3, 0), (2, 0), (1, 0)]
    older = ledger.history(ACCTS[0], limit=10, before=TxLocation(3, 0))
    assert [(w.height, w.index) for w, _ in older] == [(2, 0), (1, 0)]
    # Paging from the last entry of a page goes on inside the same block.
    page = [(w.height, w.index) for w, _ in ledger.history(ACCTS[0], limit=10, before=TxLocation(3, 1))]
    assert page == [(3, 0), (2, 0), (1, 0)]
    assert list(ledger.history(ACCTS[0], limit=10, before=TxLocation(1, 0))) == []
    assert [w.height for w, _ in ledger.history(ACCTS[0], limit=1)] == [3]
    assert ledger.locate(tx_hash(batches[0][1])) is not None
    assert ledger.locate(b"\x00" * 32) is None
    store.close()


def test_store_refuses_another_genesis_and_a_corrupt_state(tmp_path: Path) -> None:
    gen = genesis()
    store, ledger = open_store(tmp_path / "db", gen)
    state, _ = ledger.load()
    commit_chain(ledger, state, [[transfer(0, 1, 5, 0)]])
    store.close()

    store, ledger = open_store(tmp_path / "db", genesis("prsm-other-chain"))
    with pytest.raises(StoreError, match="another genesis"):
        ledger.load()
    store.close()

    # Edit an account behind the ledger's back: the accumulator no longer matches.
    store = Store(tmp_path / "db")
    store.open()
    ns = store.namespace("ledger")
    key = b"a/" + ACCTS[1]
    raw = ns.get(key)
    assert raw is not None
    ns.put(key, raw[:2] + bytes([raw[2] ^ 1]) + raw[3:])
    with pytest.raises(StoreError, match="corrupt"):
        LedgerStore(ns, gen).load()
    store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 10**20)), max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_independent_stores_reach_the_same_state_hash(tmp_path_factory: pytest.TempPathFactory, plan) -> None:  # type: ignore[no-untyped-def]
    """The same tx sequence, committed by two stores in different directories (one of them
    reopened between blocks), gives the same state hash, equal to a fresh replay's."""
    gen = genesis()
    nonces = [0, 0, 0, 0]
    batches = []
    for block_plan in plan:
        txs = []
        for sender, to, amount in block_plan:
            txs.append(transfer(sender, to, amount, nonces[sender]))
            nonces[sender] += 1
        batches.append(txs)
    hashes = []
    for variant in range(2):
        path = tmp_path_factory.mktemp(f"store{variant}")
        store, ledger = open_store(path, gen)
        state, tip = ledger.load()
        for txs in batches:
            tip_hash = commit_chain(ledger, state, [txs], tip.hash)
            if variant == 1:  # reopen from disk between blocks
                store.close()
                store, ledger = open_store(path, gen)
                state, tip = ledger.load()
                assert tip.hash == tip_hash
            else:
                tip = ledger.tip(state.height)
        hashes.append((state.state_hash(), ledger.replay().state_hash()))
        store.close()
    assert hashes[0][0] == hashes[0][1] == hashes[1][0] == hashes[1][1]


def test_make_block_stops_before_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block never exceeds MAX_BLOCK_SIZE: what does not fit waits for the next block, and
    the block still decodes."""
    import prsm_node.ledger.block as block_mod

    monkeypatch.setattr(block_mod, "MAX_BLOCK_SIZE", block_mod.BLOCK_OVERHEAD + 3 * 200)
    state = LedgerState.from_genesis(genesis())
    txs = [transfer(0, 1, 5, n) for n in range(10)]
    block, included, dropped = make_block(state, txs, proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=1)
    assert 1 <= len(included) < 10 and dropped == []
    assert len(encode_block(block)) <= block_mod.MAX_BLOCK_SIZE
    assert decode_block(encode_block(block))[1] == included
