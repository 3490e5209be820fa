"""Blocks: an ordered batch of transactions with a header that commits the resulting state.

A block at height ``h`` holds canonical tx encodings applied in order with the block's proposer,
then ``end_block(h)``; its header carries the state hash *after* that, so a node that applies
a block and gets another hash knows at once that the block (or its own state) is wrong.
``apply_block`` is the one way every node turns a block into state changes: the producer
checks its own block with it, storage replays with it, and sync (later) uses it on blocks
fetched from peers. See protocols/ledger.md, "Blocks".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .codec import MAX_TX_SIZE, _array, _bin, _chain, _pack, _uint, _unpack, decode_tx, encode_tx
from .exceptions import LedgerDecodeError, LedgerError, TxRejected
from .signing import _verify
from .state import LedgerState
from .types import ACCOUNT_SIZE, Tx

HASH_SIZE = 32
BLOCK_DOMAIN = b"prsm-block-v1"
TX_ROOT_DOMAIN = b"prsm-txroot-v1"
MAX_BLOCK_TXS = 4096
MAX_BLOCK_SIZE = 8 * 1024 * 1024
ZERO_HASH = bytes(HASH_SIZE)
# Room for the header and array headers of an encoded block (the header is ~250 bytes).
BLOCK_OVERHEAD = 1024


class BlockRejected(LedgerError):
    """Raised when a block does not follow from the current state: wrong chain, height or
    parent, a tx root or count that does not match its txs, a tx that does not apply, or a
    resulting state hash other than the one its header commits. The state is unchanged."""

    code = "block_rejected"


@dataclass(frozen=True)
class Header:
    chain_id: str
    height: int
    prev_hash: bytes  # hash of the previous block's header; zeros for height 1
    time_ms: int  # the proposer's clock, informational; never decreases along the chain
    proposer: bytes  # account that receives this block's fees and reward
    tx_root: bytes
    tx_count: int
    state_hash: bytes  # LedgerState.state_hash() after the block

    def fields(self) -> list[Any]:
        return [
            self.chain_id,
            self.height,
            self.prev_hash,
            self.time_ms,
            self.proposer,
            self.tx_root,
            self.tx_count,
            self.state_hash,
        ]

    def hash(self) -> bytes:
        """The block hash: SHA-256 of ``"prsm-block-v1"`` then the canonical header array."""
        return hashlib.sha256(BLOCK_DOMAIN + _pack(self.fields())).digest()


@dataclass(frozen=True)
class Block:
    header: Header
    txs: tuple[bytes, ...]  # canonical tx encodings, in order

    @property
    def height(self) -> int:
        return self.header.height

    def hash(self) -> bytes:
        return self.header.hash()


def tx_root(hashes: list[bytes]) -> bytes:
    """SHA-256 of ``"prsm-txroot-v1"`` then the tx hashes in block order."""
    return hashlib.sha256(TX_ROOT_DOMAIN + b"".join(hashes)).digest()


def encode_block(block: Block) -> bytes:
    """``[header, [tx, ...]]``, header ``[chain_id, height, prev_hash, time_ms, proposer,
    tx_root, tx_count, state_hash]``."""
    return _pack([block.header.fields(), list(block.txs)])


def decode_block(data: bytes) -> tuple[Block, list[Tx]]:
    """Parse a block from untrusted bytes; also decode its txs and check root and count.

    Any defect raises LedgerDecodeError. Returns the block and its decoded txs.
    """
    return _parse_block(data, decode_txs=True)


def decode_stored_block(data: bytes) -> Block:
    """Parse a block this node stored after checking it: its structure, count, tx root and
    canonical form, but not each tx (``decode_tx`` each one that is read). Reading a block of
    1,000 txs for its header or one tx costs ~1 ms instead of ~10. Any defect raises
    LedgerDecodeError."""
    return _parse_block(data, decode_txs=False)[0]


def _parse_block(data: bytes, *, decode_txs: bool) -> tuple[Block, list[Tx]]:
    f = _array(_unpack(data, MAX_BLOCK_SIZE, "block"), 2, "block")
    h = _array(f[0], 8, "block header")
    header = Header(
        chain_id=_chain(h[0], "block chain id"),
        height=_uint(h[1], "block height"),
        prev_hash=_bin(h[2], HASH_SIZE, "block prev_hash"),
        time_ms=_uint(h[3], "block time_ms"),
        proposer=_bin(h[4], ACCOUNT_SIZE, "block proposer"),
        tx_root=_bin(h[5], HASH_SIZE, "block tx_root"),
        tx_count=_uint(h[6], "block tx_count"),
        state_hash=_bin(h[7], HASH_SIZE, "block state_hash"),
    )
    raw = f[1]
    if type(raw) is not list or len(raw) > MAX_BLOCK_TXS:
        raise LedgerDecodeError(f"block txs must be an array of at most {MAX_BLOCK_TXS}")
    txs = []
    for i, item in enumerate(raw):
        if type(item) is not bytes or len(item) > MAX_TX_SIZE:
            raise LedgerDecodeError(f"block tx {i} must be bin of at most {MAX_TX_SIZE} bytes")
        if decode_txs:
            try:
                txs.append(decode_tx(item))
            except LedgerDecodeError as exc:
                raise LedgerDecodeError(f"block tx {i}: {exc}") from None
    block = Block(header, tuple(raw))
    if header.tx_count != len(raw):
        raise LedgerDecodeError(f"block header counts {header.tx_count} txs, the block holds {len(raw)}")
    # a tx's hash is the SHA-256 of its canonical bytes (those of a decoded tx are)
    if header.tx_root != tx_root([hashlib.sha256(item).digest() for item in raw]):
        raise LedgerDecodeError("block tx_root does not match its txs")
    if encode_block(block) != bytes(data):
        raise LedgerDecodeError("block is not in canonical form (a non-minimal msgpack encoding)")
    return block, txs


def make_block(
    state: LedgerState, txs: list[Tx], *, proposer: bytes, prev_hash: bytes, time_ms: int
) -> tuple[Block, list[Tx], list[tuple[Tx, TxRejected]]]:
    """Apply as many of ``txs`` as apply, in order, close the block, and return it with the
    txs it holds and the txs left out and why. ``state`` is left *with the block applied* (not checkpointed):
    the caller persists ``state.changes()`` and checkpoints, or reverts.

    Signatures are not re-checked (the mempool verified them on admission)."""
    height = state.height + 1
    included: list[Tx] = []
    dropped: list[tuple[Tx, TxRejected]] = []
    size = BLOCK_OVERHEAD
    for tx in txs[:MAX_BLOCK_TXS]:
        tx_size = len(encode_tx(tx)) + 5  # bin32 header
        if size + tx_size > MAX_BLOCK_SIZE:
            break  # the rest waits for the next block
        try:
            state.apply(tx, proposer=proposer, height=height, verify=False)
        except TxRejected as exc:
            dropped.append((tx, exc))
        else:
            included.append(tx)
            size += tx_size
    state.end_block(height, proposer=proposer)
    encoded = tuple(encode_tx(tx) for tx in included)
    header = Header(
        chain_id=state.chain_id,
        height=height,
        prev_hash=prev_hash,
        time_ms=time_ms,
        proposer=proposer,
        tx_root=tx_root([hashlib.sha256(e).digest() for e in encoded]),
        tx_count=len(encoded),
        state_hash=state.state_hash(),
    )
    return Block(header, encoded), included, dropped


def apply_block(
    state: LedgerState, block: Block, txs: list[Tx], *, prev_hash: bytes, prev_time_ms: int, verify: bool = True
) -> None:
    """Apply a decoded block on top of ``state`` (at ``block.height - 1``), all or nothing.

    ``state`` must be at a checkpoint (no uncommitted changes): a rejected block is undone
    with ``revert_to_checkpoint``.

    Raises BlockRejected and leaves ``state`` as it was when anything disagrees. On success the
    state holds the block's changes, not yet checkpointed (``state.changes()`` is the batch).
    """
    h = block.header
    if h.chain_id != state.chain_id:
        raise BlockRejected(f"block for chain {h.chain_id!r}, this ledger is {state.chain_id!r}")
    if h.height != state.height + 1:
        raise BlockRejected(f"block height {h.height} does not follow the ledger height {state.height}")
    if h.prev_hash != prev_hash:
        raise BlockRejected(f"block {h.height} does not extend block {prev_hash.hex()[:16]}")
    if h.time_ms < prev_time_ms:
        raise BlockRejected(f"block {h.height} time {h.time_ms} is before its parent's {prev_time_ms}")
    try:
        for i, tx in enumerate(txs):
            try:
                state.apply(tx, proposer=h.proposer, height=h.height, verify=verify)
            except TxRejected as exc:
                raise BlockRejected(f"block {h.height} tx {i}: {exc}") from None
        state.end_block(h.height, proposer=h.proposer)
        got = state.state_hash()
        if got != h.state_hash:
            raise BlockRejected(
                f"block {h.height} commits state {h.state_hash.hex()[:16]}, applying it gives {got.hex()[:16]}"
            )
    except BaseException:
        state.revert_to_checkpoint()
        raise


# ------------------------------------------------------------ commit certificates

COMMIT_DOMAIN = "prsm-commit-v1"
MAX_CERT_SIGNATURES = 256


PBFT_CERT_TAG = "pbft-v1"


@dataclass(frozen=True)
class PbftProof:
    """What turns a PBFT commit certificate (protocols/pbft.md) into a proof of one block.

    The validators' COMMIT signatures are over ``(view, seq, digest)``, ``digest`` being the
    PBFT batch digest of ``[meta, *txs]``; ``seq`` is the block height. The block holds the
    txs that applied; ``skipped`` gives back the others (index among the batch's txs, tx
    bytes) so anyone can rebuild the batch, check its digest and re-execute it into this
    very block. ``meta`` is the batch's first request (proposer, time), empty for the null
    batch of a view change."""

    view: int
    seq: int
    digest: bytes
    meta: bytes
    skipped: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class Certificate:
    """Validators' signatures that a block is committed, in ascending account order, of one
    of two kinds (``kind``):

    - ``"signatures"`` (``pbft`` is None): ``(account, signature)`` over ``commit_payload``,
      what a solo validator writes; checked with ``verify_certificate``.
    - ``"pbft"``: a PBFT commit certificate, ``(validator, COMMIT signature)`` over
      ``(pbft.view, pbft.seq, pbft.digest)``; checked by the chain service against the
      validator set, then by re-executing the rebuilt batch."""

    signatures: tuple[tuple[bytes, bytes], ...]
    pbft: PbftProof | None = None

    @property
    def kind(self) -> str:
        return "signatures" if self.pbft is None else "pbft"


def commit_payload(chain_id: str, height: int, block_hash: bytes) -> bytes:
    """What a validator signs to commit a block: ``["prsm-commit-v1", chain_id, height, hash]``."""
    return _pack([COMMIT_DOMAIN, chain_id, height, block_hash])


def sign_commit(key: Any, block: Block) -> tuple[bytes, bytes]:
    """One validator's commit signature (``key`` is a nacl SigningKey)."""
    payload = commit_payload(block.header.chain_id, block.height, block.hash())
    return bytes(key.verify_key), bytes(key.sign(payload).signature)


def encode_certificate(cert: Certificate) -> bytes:
    """Signatures kind: ``[[account, sig], ...]``. PBFT kind: ``["pbft-v1", view, seq,
    digest, [[validator, sig], ...], meta, [[index, tx], ...]]``."""
    sigs = [[account, sig] for account, sig in cert.signatures]
    p = cert.pbft
    if p is None:
        return _pack(sigs)
    return _pack([PBFT_CERT_TAG, p.view, p.seq, p.digest, sigs, p.meta, [[i, tx] for i, tx in p.skipped]])


def _signature_pairs(items: Any) -> tuple[tuple[bytes, bytes], ...]:
    if type(items) is not list or not 1 <= len(items) <= MAX_CERT_SIGNATURES:
        raise LedgerDecodeError(f"certificate must hold 1..{MAX_CERT_SIGNATURES} signatures")
    pairs = []
    for i, item in enumerate(items):
        f = _array(item, 2, f"certificate entry {i}")
        pairs.append((_bin(f[0], ACCOUNT_SIZE, f"certificate entry {i} account"), _bin(f[1], 64, f"entry {i} sig")))
    if [a for a, _ in pairs] != sorted({a for a, _ in pairs}):
        raise LedgerDecodeError("certificate accounts must be unique and ascending")
    return tuple(pairs)


def _pbft_proof(f: list[Any]) -> PbftProof:
    meta = f[5]
    if type(meta) is not bytes or len(meta) > MAX_TX_SIZE:
        raise LedgerDecodeError(f"certificate meta must be bin of at most {MAX_TX_SIZE} bytes")
    raw = f[6]
    if type(raw) is not list or len(raw) > MAX_BLOCK_TXS:
        raise LedgerDecodeError(f"certificate skipped txs must be an array of at most {MAX_BLOCK_TXS}")
    skipped = []
    for i, item in enumerate(raw):
        e = _array(item, 2, f"certificate skipped entry {i}")
        tx = e[1]
        if type(tx) is not bytes or not 1 <= len(tx) <= MAX_TX_SIZE:
            raise LedgerDecodeError(f"certificate skipped entry {i} must hold a tx of at most {MAX_TX_SIZE} bytes")
        skipped.append((_uint(e[0], f"certificate skipped entry {i} index"), tx))
    if [i for i, _ in skipped] != sorted({i for i, _ in skipped}):
        raise LedgerDecodeError("certificate skipped indexes must be unique and ascending")
    return PbftProof(
        _uint(f[1], "certificate view"),
        _uint(f[2], "certificate seq"),
        _bin(f[3], HASH_SIZE, "certificate digest"),
        meta,
        tuple(skipped),
    )


def decode_certificate(data: bytes) -> Certificate:
    """Parse either kind of certificate from untrusted bytes (any defect: LedgerDecodeError)."""
    items = _unpack(data, MAX_BLOCK_SIZE, "certificate")
    if type(items) is list and items and type(items[0]) is str:
        if items[0] != PBFT_CERT_TAG:
            raise LedgerDecodeError(f"unknown certificate kind {items[0][:32]!r}")
        f = _array(items, 7, "pbft certificate")
        cert = Certificate(_signature_pairs(f[4]), _pbft_proof(f))
    else:
        cert = Certificate(_signature_pairs(items))
    if encode_certificate(cert) != bytes(data):
        raise LedgerDecodeError("certificate is not in canonical form")
    return cert


def verify_certificate(cert: Certificate, block: Block, validators: frozenset[bytes], quorum: int) -> None:
    """Raise BlockRejected unless at least ``quorum`` distinct validators signed this block
    (a certificate of the signatures kind; the PBFT kind is checked by the chain service)."""
    if cert.pbft is not None:
        raise BlockRejected(f"block {block.height}: a PBFT certificate needs the validator set to check")
    payload = commit_payload(block.header.chain_id, block.height, block.hash())
    good = {a for a, sig in cert.signatures if a in validators and _verify(a, payload, sig)}
    if len(good) < quorum:
        raise BlockRejected(
            f"block {block.height}: {len(good)} valid validator signatures, {quorum} needed to accept it"
        )
