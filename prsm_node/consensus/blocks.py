"""PBFT batches as ledger blocks: what a batch holds, how a backup checks it, and how every
node turns a committed batch into the same block (protocols/pbft.md, "Batches and blocks").

A batch is ``[meta, tx, ...]``: ``meta = msgpack(["prsm-batch-meta-v1", proposer, time_ms])``
(the primary that made it and its clock), then canonical signed tx encodings. The null batch
``()`` of a view change makes an empty block. Committed batch ``seq`` becomes block height
``seq``: its txs are applied in order with ``make_block`` and those that no longer apply are
left out (``skipped``), the same way on every node, so the block and its hash follow from the
batch and the chain before it. The checkpoint digest a replica reports is that block's hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack

from ..chain.verifier import signatures_valid
from ..ledger.block import MAX_BLOCK_TXS, Block, make_block
from ..ledger.codec import decode_tx
from ..ledger.exceptions import LedgerDecodeError
from ..ledger.state import LedgerState
from ..ledger.types import Tx
from ..strict_msgpack import unpack_strict

META_DOMAIN = "prsm-batch-meta-v1"
MAX_META_SIZE = 128


class BadBatch(ValueError):
    """Raised when a batch (or its meta) is not one an honest primary makes."""


def encode_meta(proposer: bytes, time_ms: int) -> bytes:
    return msgpack.packb([META_DOMAIN, proposer, time_ms], use_bin_type=True)  # type: ignore[no-any-return]


def decode_meta(data: bytes) -> tuple[bytes, int]:
    """``(proposer, time_ms)`` of a canonical meta request (else BadBatch)."""
    value = unpack_strict(data, MAX_META_SIZE, "batch meta", BadBatch)
    if (
        type(value) is not list
        or len(value) != 3
        or value[0] != META_DOMAIN
        or type(value[1]) is not bytes
        or len(value[1]) != 32
        or type(value[2]) is not int
        or not 0 <= value[2] < 2**63
    ):
        raise BadBatch("batch meta is not [domain, proposer, time_ms]")
    if encode_meta(value[1], value[2]) != data:
        raise BadBatch("batch meta is not canonical")
    return value[1], value[2]


Known = Callable[[bytes], "Tx | None"]
"""A tx this node checked already (its mempool), by the SHA-256 of its encoding, or None."""


def _unknown(digest: bytes) -> Tx | None:
    return None


def check_batch(
    chain_id: str,
    validators: frozenset[bytes],
    batch: Sequence[bytes],
    *,
    known: Known = _unknown,
) -> list[tuple[bytes, Tx]]:
    """What a backup checks before it accepts a PRE-PREPARE (BadBatch on any defect): the
    meta names a validator; every tx decodes canonically, is for this chain, appears once,
    and its signatures verify. A tx ``known`` by the hash of its bytes (in the mempool:
    decoded, canonical and verified on admission) is not decoded or verified again.
    Nothing here depends on the ledger state, so every honest replica agrees.
    Returns the txs it decoded and verified itself, with their hashes (for the caller to
    remember, so that another copy of one costs no second check)."""
    checked: list[tuple[bytes, Tx]] = []
    if not batch:
        return checked
    proposer, _ = decode_meta(batch[0])
    if proposer not in validators:
        raise BadBatch("the batch's proposer is not a validator")
    if len(batch) - 1 > MAX_BLOCK_TXS:
        raise BadBatch(f"a batch holds at most {MAX_BLOCK_TXS} txs")
    seen: set[bytes] = set()
    for i, raw in enumerate(batch[1:]):
        digest = hashlib.sha256(raw).digest()  # = tx_hash of the decoded tx
        if digest in seen:
            raise BadBatch(f"batch tx {i} appears twice")
        seen.add(digest)
        tx = known(digest)
        if tx is not None and tx.chain_id == chain_id:
            continue
        try:
            tx = decode_tx(raw)
        except LedgerDecodeError as exc:
            raise BadBatch(f"batch tx {i}: {exc}") from None
        if tx.chain_id != chain_id:
            raise BadBatch(f"batch tx {i} is for chain {tx.chain_id!r}")
        if not signatures_valid(tx):
            raise BadBatch(f"batch tx {i}: a signature does not verify")
        checked.append((digest, tx))
    return checked


@dataclass
class Executed:
    block: Block
    included: list[Tx]
    dropped: list[Tx]
    skipped: tuple[tuple[int, bytes], ...]


def execute_batch(
    state: LedgerState,
    batch: Sequence[bytes],
    *,
    prev_hash: bytes,
    prev_time_ms: int,
    null_proposer: bytes,
    known: Known = _unknown,
) -> Executed:
    """Apply ``batch`` on ``state`` as the next block; ``state`` is left with the block
    applied (not checkpointed: the caller commits or reverts). Deterministic: a tx that does
    not decode or does not apply is skipped, listed in ``skipped`` (batch tx index, bytes).
    A tx ``known`` by the hash of its bytes is taken as decoded already (the same value)."""
    if batch:
        try:
            proposer, time_ms = decode_meta(batch[0])
        except BadBatch:
            proposer, time_ms = null_proposer, prev_time_ms
        raw = list(batch[1:])
    else:
        proposer, time_ms, raw = null_proposer, prev_time_ms, []
    decoded: list[tuple[int, Tx]] = []
    skipped: list[tuple[int, bytes]] = []
    for i, data in enumerate(raw):
        found = known(hashlib.sha256(data).digest()) if known is not _unknown else None
        try:
            tx = found if found is not None else decode_tx(data)
        except LedgerDecodeError:
            skipped.append((i, data))
            continue
        if tx.chain_id != state.chain_id:
            skipped.append((i, data))
            continue
        decoded.append((i, tx))
    block, included, dropped = make_block(
        state,
        [tx for _, tx in decoded],
        proposer=proposer,
        prev_hash=prev_hash,
        time_ms=max(time_ms, prev_time_ms),
    )
    kept = {id(tx) for tx in included}
    skipped += [(i, raw[i]) for i, tx in decoded if id(tx) not in kept]
    skipped.sort()
    return Executed(block, included, [tx for tx, _ in dropped], tuple(skipped))


def rebuild_batch(block: Block, meta: bytes, skipped: Sequence[tuple[int, bytes]]) -> tuple[bytes, ...]:
    """The batch a PBFT block was made from: its txs with the skipped ones put back."""
    total = len(block.txs) + len(skipped)
    if any(i >= total for i, _ in skipped):
        raise BadBatch("a skipped tx index is past the end of the batch")
    out: list[bytes] = []
    included = iter(block.txs)
    where = dict(skipped)
    for i in range(total):
        out.append(where[i] if i in where else next(included))
    if not meta:
        if out:
            raise BadBatch("a null batch holds no txs")
        return ()
    return (meta, *out)
