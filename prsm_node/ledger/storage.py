"""The ledger in LevelDB: accounts, settled receipts, blocks, certificates, tx index, history.

Every block lands in **one** synced write batch holding the block, its certificate, its tx
index and history entries, every account it touched, the receipts it settled, the new height,
minted total and state-hash accumulator. LevelDB applies a batch atomically (one log record),
so after a crash at any point the database holds the old height or the new one, never a mix.

Keys (inside the ``ledger/`` namespace of the node's database; heights are 8-byte big-endian
so they sort numerically, indexes 4-byte big-endian)::

    m/genesis            SHA-256 of the genesis this data belongs to
    m/height             last committed height
    m/minted             amount16 minted so far
    m/acc                the 2048-byte state-hash accumulator
    a/<account>          encode_account(state)
    r/<payer><id>        b"" (a settled receipt)
    b/<height>           encode_block
    c/<height>           encode_certificate
    t/<tx hash>          height || index
    h/<account><height><index>   tx hash (history: sender, recipient, receipt payers, voter)
    v/<model><voter>     encode_vote_record (the latest breaker vote recorded per model and voter)
    vh/<model><height><index>    tx hash (history of the breaker votes on a model)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from ..exceptions import StoreError
from ..genesis import Genesis
from ..store import Namespace
from . import statehash
from .block import (
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
)
from .codec import AMOUNT_SIZE, decode_account, decode_vote_record, encode_account, encode_vote_record, tx_hash
from .exceptions import LedgerDecodeError, LedgerError
from .params import LedgerParams, genesis_holdings
from .state import LedgerState, StateChanges
from .types import BreakerVote, Settle, Transfer, Tx

META_GENESIS = b"m/genesis"
META_HEIGHT = b"m/height"
META_MINTED = b"m/minted"
META_ACC = b"m/acc"


def _h(height: int) -> bytes:
    return height.to_bytes(8, "big")


def genesis_id(genesis: Genesis) -> bytes:
    """SHA-256 of the genesis as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(genesis.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def touched_accounts(tx: Tx) -> list[bytes]:
    """Accounts whose history lists this tx: the sender, a transfer's recipient, the payers
    of a settlement's receipts, the voter of a breaker vote (each once, sender first)."""
    out = [tx.sender]
    if isinstance(tx.body, Transfer):
        out.append(tx.body.to)
    elif isinstance(tx.body, Settle):
        out.extend(r.payer for r in tx.body.receipts)
    elif isinstance(tx.body, BreakerVote):
        out.append(tx.body.vote.voter)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Tip:
    """The last committed block (height 0: genesis, no block)."""

    height: int
    hash: bytes
    time_ms: int


@dataclass(frozen=True)
class TxLocation:
    height: int
    index: int


class LedgerStore:
    def __init__(self, ns: Namespace, genesis: Genesis) -> None:
        self._ns = ns
        self._genesis = genesis
        self._genesis_id = genesis_id(genesis)

    # ------------------------------------------------------------ open

    def load(self) -> tuple[LedgerState, Tip]:
        """The state as of the last committed block; a new database starts at genesis.

        Checks that the data belongs to this genesis, that the stored accumulator equals the
        one recomputed from the stored accounts, and that it gives the last block's state hash.
        """
        stored = self._ns.get(META_GENESIS)
        if stored is None:
            return self._init_genesis()
        if stored != self._genesis_id:
            raise StoreError(
                "the ledger in this data directory belongs to another genesis; "
                "point --home at the right node, or remove data/ (with the daemon stopped) to resync"
            )
        try:
            height = int.from_bytes(self._get(META_HEIGHT), "big")
            minted = int.from_bytes(self._get(META_MINTED), "big")
            accounts = {k[2:]: decode_account(v) for k, v in self._ns.scan(b"a/")}
            settled = [k[2:] for k, _ in self._ns.scan(b"r/")]
            votes = {k[2:]: decode_vote_record(v) for k, v in self._ns.scan(b"v/")}
            supply = sum(sum(part.values()) for part in genesis_holdings(self._genesis))
            state = LedgerState(
                self._genesis.chain_id,
                LedgerParams.from_genesis_params(self._genesis.params),
                accounts=accounts,
                settled=settled,
                height=height,
                genesis_supply=supply,
                minted=minted,
                votes=votes,
            )
        except (LedgerError, ValueError) as exc:
            raise StoreError(f"the stored ledger is corrupt: {exc}") from None
        if int.from_bytes(self._get(META_ACC), "little") != state.accumulator:
            raise StoreError("the stored ledger is corrupt: its accounts do not match its state hash")
        tip = self.tip(height)
        if height and self.block(height).header.state_hash != state.state_hash():
            raise StoreError(f"the stored ledger is corrupt: the state does not match block {height}")
        return state, tip

    def _init_genesis(self) -> tuple[LedgerState, Tip]:
        state = LedgerState.from_genesis(self._genesis)
        with self._ns.write_batch(sync=True) as batch:
            for key, account in state.accounts():
                batch.put(b"a/" + key, encode_account(account))
            batch.put(META_HEIGHT, _h(0))
            batch.put(META_MINTED, (0).to_bytes(AMOUNT_SIZE, "big"))
            batch.put(META_ACC, state.accumulator.to_bytes(statehash.ACC_BYTES, "little"))
            batch.put(META_GENESIS, self._genesis_id)  # last: its presence means "initialised"
        state.checkpoint()
        return state, Tip(0, ZERO_HASH, 0)

    def _get(self, key: bytes) -> bytes:
        value = self._ns.get(key)
        if value is None:
            raise StoreError(f"the stored ledger is corrupt: {key.decode()} is missing")
        return value

    # ------------------------------------------------------------ commit

    def commit(self, block: Block, cert: Certificate, txs: list[Tx], changes: StateChanges) -> None:
        """Write one block and every state change it made, atomically and synced."""
        if changes.height != block.height:
            raise LedgerError(f"changes are for height {changes.height}, the block is {block.height}")
        h = _h(block.height)
        with self._ns.write_batch(sync=True) as batch:
            batch.put(b"b/" + h, encode_block(block))
            batch.put(b"c/" + h, encode_certificate(cert))
            for index, tx in enumerate(txs):
                digest = tx_hash(tx)
                where = h + index.to_bytes(4, "big")
                batch.put(b"t/" + digest, where)
                for who in touched_accounts(tx):
                    batch.put(b"h/" + who + where, digest)
                if isinstance(tx.body, BreakerVote):
                    batch.put(b"vh/" + tx.body.vote.model + where, digest)
            for key, account in changes.accounts.items():
                if account.is_empty:
                    batch.delete(b"a/" + key)
                else:
                    batch.put(b"a/" + key, encode_account(account))
            for key in changes.settled:
                batch.put(b"r/" + key, b"")
            for key, record in changes.votes.items():
                batch.put(b"v/" + key, encode_vote_record(record))
            batch.put(META_HEIGHT, h)
            batch.put(META_MINTED, changes.minted.to_bytes(AMOUNT_SIZE, "big"))
            batch.put(META_ACC, changes.accumulator.to_bytes(statehash.ACC_BYTES, "little"))

    # ------------------------------------------------------------ reads

    def tip(self, height: int) -> Tip:
        if height == 0:
            return Tip(0, ZERO_HASH, 0)
        block = self.block(height)
        return Tip(height, block.hash(), block.header.time_ms)

    def block_bytes(self, height: int) -> bytes | None:
        return self._ns.get(b"b/" + _h(height))

    def block(self, height: int) -> Block:
        data = self.block_bytes(height)
        if data is None:
            raise StoreError(f"the stored ledger is corrupt: block {height} is missing")
        try:
            return decode_stored_block(data)
        except LedgerDecodeError as exc:
            raise StoreError(f"the stored ledger is corrupt: block {height}: {exc}") from None

    def certificate_bytes(self, height: int) -> bytes | None:
        return self._ns.get(b"c/" + _h(height))

    def certificate(self, height: int) -> Certificate | None:
        data = self.certificate_bytes(height)
        return decode_certificate(data) if data is not None else None

    def locate(self, digest: bytes) -> TxLocation | None:
        where = self._ns.get(b"t/" + digest)
        if where is None:
            return None
        return TxLocation(int.from_bytes(where[:8], "big"), int.from_bytes(where[8:], "big"))

    def history(
        self, account: bytes, *, limit: int, before: TxLocation | None = None
    ) -> Iterator[tuple[TxLocation, bytes]]:
        """The txs touching ``account``, newest first; ``before``: only those strictly older
        than that position (pass the last one of a page to get the next page)."""
        prefix = b"h/" + account
        start = None
        if before is not None:
            if before.height == 0 or (before.height == 1 and before.index == 0):
                return
            if before.index == 0:
                start = prefix + _h(before.height - 1) + b"\xff" * 4
            else:
                start = prefix + _h(before.height) + (before.index - 1).to_bytes(4, "big")
        for count, (key, digest) in enumerate(self._ns.scan(prefix, reverse=True, start=start)):
            if count >= limit:
                return
            rest = key[len(prefix) :]
            yield TxLocation(int.from_bytes(rest[:8], "big"), int.from_bytes(rest[8:], "big")), digest

    def vote_history(self, model: bytes, *, limit: int) -> Iterator[tuple[TxLocation, bytes]]:
        """The committed BreakerVote txs on ``model``, oldest first: (where, tx hash)."""
        prefix = b"vh/" + model
        for count, (key, digest) in enumerate(self._ns.scan(prefix)):
            if count >= limit:
                return
            rest = key[len(prefix) :]
            yield TxLocation(int.from_bytes(rest[:8], "big"), int.from_bytes(rest[8:], "big")), digest

    # ------------------------------------------------------------ audit

    def replay(self) -> LedgerState:
        """A fresh state from genesis with every stored block re-applied and every signature
        re-verified: what the stored state must equal."""
        state = LedgerState.from_genesis(self._genesis)
        prev, prev_time = ZERO_HASH, 0
        height = int.from_bytes(self._get(META_HEIGHT), "big")
        for h in range(1, height + 1):
            data = self.block_bytes(h)
            if data is None:
                raise StoreError(f"the stored ledger is corrupt: block {h} is missing")
            try:
                block, txs = decode_block(data)
                apply_block(state, block, txs, prev_hash=prev, prev_time_ms=prev_time)
            except (LedgerDecodeError, BlockRejected) as exc:
                raise StoreError(f"the stored ledger is corrupt: block {h}: {exc}") from None
            state.checkpoint()
            prev, prev_time = block.hash(), block.header.time_ms
        return state
