"""A follower checks every PBFT-certified block it syncs: a lying peer's forged block or
certificate is rejected and leaves the ledger as it was; the true block is accepted."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import trio

from prsm_node.chain.service import ChainService
from prsm_node.config import LedgerSection
from prsm_node.consensus.blocks import BadBatch, check_batch, encode_meta, execute_batch, rebuild_batch
from prsm_node.consensus.messages import Commit, KeySigner, batch_digest, signing_payload
from prsm_node.genesis import Validator, development_genesis
from prsm_node.keys import NodeKey
from prsm_node.ledger.block import (
    ZERO_HASH,
    Block,
    BlockRejected,
    Certificate,
    PbftProof,
    decode_certificate,
    encode_block,
    encode_certificate,
    tx_root,
)
from prsm_node.ledger.codec import decode_tx, encode_tx, tx_hash
from prsm_node.ledger.signing import sign_tx
from prsm_node.ledger.state import LedgerState
from prsm_node.ledger.types import Transfer
from prsm_node.store import Store

KEYS = [NodeKey(bytes([i + 1]) * 32) for i in range(5)]  # 4 validators, then a client
VALIDATORS = [k.account for k in KEYS[:4]]


def _genesis():  # type: ignore[no-untyped-def]
    return development_genesis(
        "pbft-test",
        [Validator(account=k.account.hex(), peer_id=str(k.peer_id)) for k in KEYS[:4]],
        [k.account.hex() for k in KEYS],
    )


def _certify(chain_id: str, seq: int, batch: tuple[bytes, ...], signers: list[NodeKey], view: int = 0):  # type: ignore[no-untyped-def]
    digest = batch_digest(chain_id, batch)
    sigs = []
    for k in signers:
        s = KeySigner(k.signing_key)
        sigs.append((s.public_key, s.sign(signing_payload(Commit(s.public_key, view, seq, digest), chain_id))))
    return view, digest, tuple(sorted(sigs))


def _transfer(chain_id: str, nonce: int, amount: int) -> bytes:
    tx = sign_tx(KEYS[4].signing_key, chain_id=chain_id, nonce=nonce, fee=0, body=Transfer(KEYS[1].account, amount))
    return encode_tx(tx)


async def test_follower_rejects_forged_blocks_and_certificates(short_tmp: Path) -> None:
    genesis = _genesis()
    cid = genesis.chain_id
    tx1, tx2 = _transfer(cid, 0, 5), _transfer(cid, 1, 7)
    batch = (encode_meta(VALIDATORS[2], 1_700_000_000_000), tx1, tx2)
    scratch = LedgerState.from_genesis(genesis)
    done = execute_batch(scratch, batch, prev_hash=ZERO_HASH, prev_time_ms=0, null_proposer=VALIDATORS[0])
    assert len(done.included) == 2 and done.skipped == ()
    block = done.block
    view, digest, sigs = _certify(cid, 1, batch, KEYS[:3])
    cert = Certificate(sigs, PbftProof(view, 1, digest, batch[0], ()))
    assert decode_certificate(encode_certificate(cert)) == cert
    assert rebuild_batch(block, batch[0], ()) == batch

    def forged_header(**change: object) -> Block:
        return Block(dataclasses.replace(block.header, **change), block.txs)  # type: ignore[arg-type]

    only_tx1 = Block(
        dataclasses.replace(block.header, tx_count=1, tx_root=tx_root([tx_hash_of(tx1)])), (tx1,)
    )
    hidden = ((1, tx2),)

    def proof(seq: int, skipped: tuple[tuple[int, bytes], ...]) -> PbftProof:
        return PbftProof(view, seq, digest, batch[0], skipped)

    outsider = NodeKey(b"\x77" * 32)
    lies: list[tuple[str, bytes, Certificate]] = [
        ("another time in the header", encode_block(forged_header(time_ms=5)), cert),
        ("another state hash", encode_block(forged_header(state_hash=b"\x01" * 32)), cert),
        ("two signatures", encode_block(block), Certificate(sigs[:2], cert.pbft)),
        (
            "a non-validator signs",
            encode_block(block),
            Certificate(_certify(cid, 1, batch, [KEYS[0], KEYS[1], outsider])[2], cert.pbft),
        ),
        ("the certificate of another seq", encode_block(block), Certificate(sigs, proof(2, ()))),
        # A tx that applies claimed as skipped: the batch digest matches, execution does not.
        ("a tx hidden as skipped", encode_block(only_tx1), Certificate(sigs, proof(1, hidden))),
        ("a solo certificate", encode_block(block), Certificate(((VALIDATORS[0], b"\x00" * 64),))),
    ]

    store = Store(short_tmp / "db")
    store.open()
    try:
        chain = ChainService(store, genesis, KEYS[4], LedgerSection())
        async with trio.open_nursery() as nursery:
            await nursery.start(chain.run)
            before = chain.state.state_hash()
            for why, block_bytes, bad in lies:
                with trio.fail_after(10), pytest.raises(BlockRejected):
                    await chain.apply_synced([(block_bytes, encode_certificate(bad))])
                assert (chain.tip.height, chain.state.state_hash()) == (0, before), why
            with trio.fail_after(10):
                assert await chain.apply_synced([(encode_block(block), encode_certificate(cert))]) == 1
            assert chain.tip.hash == block.hash() and chain.state.state_hash() == scratch.state_hash()
            assert chain.ledger.certificate(1) == cert
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def tx_hash_of(encoded: bytes) -> bytes:
    from prsm_node.ledger.codec import decode_tx

    return tx_hash(decode_tx(encoded))



def test_known_txs_skip_decoding_and_verification_but_give_the_same_block() -> None:
    """A backup takes txs its mempool checked already by the hash of their bytes; an unknown
    tx is still decoded and verified, and execution is the same either way."""
    genesis = _genesis()
    cid = genesis.chain_id
    vals = frozenset(VALIDATORS)
    good = [_transfer(cid, n, 5) for n in range(3)]
    forged = bytearray(good[1])
    forged[-1] ^= 1  # the signature's last byte
    batch = (encode_meta(VALIDATORS[0], 1_700_000_000_000), *good)
    decoded = {hashlib.sha256(raw).digest(): decode_tx(raw) for raw in good}
    assert check_batch(cid, vals, batch, known=decoded.get) == []  # nothing left to check
    checked = check_batch(cid, vals, batch)  # what it checked itself, for the caller to remember
    assert [(d, encode_tx(tx)) for d, tx in checked] == [(hashlib.sha256(raw).digest(), raw) for raw in good]
    bad = (batch[0], good[0], bytes(forged))
    with pytest.raises(BadBatch, match="signature"):
        check_batch(cid, vals, bad, known=decoded.get)
    with pytest.raises(BadBatch, match="twice"):
        check_batch(cid, vals, (batch[0], good[0], good[0]), known=decoded.get)
    plain = execute_batch(
        LedgerState.from_genesis(genesis), batch, prev_hash=ZERO_HASH, prev_time_ms=0, null_proposer=VALIDATORS[0]
    )
    fast = execute_batch(
        LedgerState.from_genesis(genesis),
        batch,
        prev_hash=ZERO_HASH,
        prev_time_ms=0,
        null_proposer=VALIDATORS[0],
        known=decoded.get,
    )
    assert fast.block == plain.block and fast.skipped == plain.skipped == ()


async def test_a_tx_verified_in_a_batch_is_not_verified_again(short_tmp: Path) -> None:
    """A tx whose signature a backup checked in a PRE-PREPARE's batch (``remember_verified``)
    is admitted from a late forwarded copy, and taken in a synced block, without a second
    check; a copy with other bytes (another signature) is still checked, and refused."""
    genesis = _genesis()
    cid = genesis.chain_id
    raws = [_transfer(cid, n, 5) for n in range(3)]
    batch = (encode_meta(VALIDATORS[0], 1_700_000_000_000), *raws)
    forged = bytearray(raws[2])
    forged[-1] ^= 1
    store = Store(short_tmp / "db")
    store.open()
    try:
        chain = ChainService(store, genesis, KEYS[4], LedgerSection())
        async with trio.open_nursery() as nursery:
            await nursery.start(chain.run)
            chain.remember_verified(check_batch(cid, frozenset(VALIDATORS), batch[:3]))  # txs 0 and 1
            assert chain.known_tx(hashlib.sha256(raws[0]).digest()) is not None
            assert chain.known_tx(hashlib.sha256(raws[2]).digest()) is None
            with trio.fail_after(10):
                out = await chain.submit_many([decode_tx(r) for r in raws[:2]] + [decode_tx(bytes(forged))])
            assert [type(r).__name__ for r in out] == ["Pending", "Pending", "BadSignature"]
            assert chain.verifier.verified == 1  # only the forged copy was checked
            scratch = LedgerState.from_genesis(genesis)
            done = execute_batch(scratch, batch, prev_hash=ZERO_HASH, prev_time_ms=0, null_proposer=VALIDATORS[0])
            view, digest, sigs = _certify(cid, 1, batch, KEYS[:3])
            cert = Certificate(sigs, PbftProof(view, 1, digest, batch[0], ()))
            with trio.fail_after(10):
                assert await chain.apply_synced([(encode_block(done.block), encode_certificate(cert))]) == 1
            assert chain.verifier.verified == 2  # tx 2 only: txs 0 and 1 were checked before
            assert chain.state.state_hash() == scratch.state_hash()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
