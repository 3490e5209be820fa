"""Ledger throughput on one node: signed transfers applied and committed per second, beside
the rate of Ed25519 verification alone measured in the same run.

Both paths run the node's own chain service (prsm_node.chain.service.ChainService) on a real
LevelDB store in a temp dir; only the network is left out.

- **apply** (the headline): blocks of 1,000 signed transfers arrive as bytes, as
  ``/prsm/sync/1.0.0`` delivers them, 64 per batch; each is decoded, its commit certificate
  and every tx signature checked (on the verifier's worker thread, one block ahead), every tx
  applied, the state hash updated, and the block written with all its state changes in one
  synced LevelDB batch (``ChainService.apply_synced``).
- **admit + produce** (a validator): each tx arrives alone as bytes from one of 200
  concurrent submitters; decoded, signature checked (batched on the worker thread), admitted
  to the mempool, then blocks made and committed by the producer.

The baseline verifies the same signatures one after another on one thread. Targets: apply
>= 70% of verification-only; a 1,000-transfer block applies and commits in < 100 ms not
counting verification (apply + state hash + supply check + synced write).

    python scripts/bench/ledger.py [--txs 20000] [--senders 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nacl.signing
import trio

from prsm_node.chain.service import ChainService
from prsm_node.config import LedgerSection
from prsm_node.genesis import Genesis, Validator
from prsm_node.keys import NodeKey
from prsm_node.ledger import LedgerState, Transfer, decode_tx, encode_tx, sign_tx
from prsm_node.ledger.block import (
    ZERO_HASH,
    Block,
    Certificate,
    decode_block,
    encode_block,
    encode_certificate,
    make_block,
    sign_commit,
)
from prsm_node.ledger.signing import verify_tx_signature
from prsm_node.ledger.types import Tx
from prsm_node.store import Store

CHAIN = "prsm-bench"
VALIDATOR = NodeKey(b"\x99" * 32)
FOLLOWER = NodeKey(b"\x98" * 32)


def build(txs: int, senders: int) -> tuple[Genesis, list[list[bytes]]]:
    """Signed transfers as wire bytes, grouped per sender in nonce order."""
    keys = [nacl.signing.SigningKey(i.to_bytes(4, "big") * 8) for i in range(senders)]
    accounts = [bytes(k.verify_key) for k in keys]
    gen = Genesis(
        CHAIN,
        "bench",
        0,
        validators=[Validator(VALIDATOR.account.hex(), "bench")],
        balances={a.hex(): str(10**24) for a in accounts},
    )
    per_sender: list[list[bytes]] = [[] for _ in range(senders)]
    for n in range(txs):
        i = n % senders
        to = accounts[(i * 7 + 1) % senders]
        tx = sign_tx(keys[i], chain_id=CHAIN, nonce=n // senders, fee=1, body=Transfer(to, 10**15))
        per_sender[i].append(encode_tx(tx))
    return gen, per_sender


def make_blocks(gen: Genesis, per_sender: list[list[bytes]], size: int) -> list[tuple[bytes, bytes]]:
    """The same txs as committed blocks of ``size``, signed by the validator (not timed)."""
    state = LedgerState.from_genesis(gen)
    ordered = [data for batch in zip(*per_sender, strict=False) for data in batch]
    out, prev = [], ZERO_HASH
    for i in range(0, len(ordered), size):
        txs = [decode_tx(d) for d in ordered[i : i + size]]
        block, _, dropped = make_block(state, txs, proposer=VALIDATOR.account, prev_hash=prev, time_ms=i)
        assert not dropped
        state.checkpoint()
        cert = Certificate((sign_commit(VALIDATOR.signing_key, block),))
        out.append((encode_block(block), encode_certificate(cert)))
        prev = block.hash()
    return out


async def apply_path(gen: Genesis, blocks: list[tuple[bytes, bytes]], directory: Path) -> tuple[float, list[float]]:
    store = Store(directory / "db")
    store.open()
    try:
        chain = ChainService(store, gen, FOLLOWER, LedgerSection())
        timings: list[float] = []
        inner = chain._apply_checked

        async def timed(block: Block, txs: list[Tx], cert: Certificate) -> None:
            t0 = time.perf_counter()
            await inner(block, txs, cert)
            timings.append((time.perf_counter() - t0) * 1000)

        chain._apply_checked = timed  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(chain.run)
            total = 0
            start = time.perf_counter()
            for i in range(0, len(blocks), 64):
                await chain.apply_synced(blocks[i : i + 64])
            elapsed = time.perf_counter() - start
            for block_bytes, _ in blocks:
                total += decode_block(block_bytes)[0].header.tx_count
            assert chain.tip.height == len(blocks)
            nursery.cancel_scope.cancel()
        return total / elapsed, timings
    finally:
        store.close()


def verify_only(per_sender: list[list[bytes]]) -> float:
    txs = [decode_tx(e) for txs in per_sender for e in txs]
    start = time.perf_counter()
    for tx in txs:
        if not verify_tx_signature(tx):
            raise SystemExit("a signature failed")
    return len(txs) / (time.perf_counter() - start)


async def full_path(
    gen: Genesis, per_sender: list[list[bytes]], directory: Path, submitters: int
) -> tuple[float, list[tuple[int, float]]]:
    cfg = LedgerSection(block_interval=0.05, max_block_txs=1000, mempool_size=100_000, mempool_per_sender=64)
    store = Store(directory / "db")
    store.open()
    total = sum(len(t) for t in per_sender)
    try:
        chain = ChainService(store, gen, VALIDATOR, cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(chain.run)

            async def submit_for(senders: list[list[bytes]]) -> None:
                # Each sender's txs in nonce order; senders interleaved.
                for batch in zip(*senders, strict=False):
                    for data in batch:
                        await chain.submit(decode_tx(data))

            start = time.perf_counter()
            async with trio.open_nursery() as submit:
                for k in range(submitters):
                    submit.start_soon(submit_for, per_sender[k::submitters])
            while len(chain.mempool):
                await chain.wait_height(chain.tip.height + 1)
            elapsed = time.perf_counter() - start
            committed = sum(n for n, _ in chain.block_timings)
            assert committed == total, (committed, total)
            nursery.cancel_scope.cancel()
        return total / elapsed, list(chain.block_timings)
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--txs", type=int, default=20_000)
    parser.add_argument("--senders", type=int, default=1_000)
    parser.add_argument("--submitters", type=int, default=200, help="concurrent submitting tasks")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"building {args.txs} signed transfers from {args.senders} accounts...", flush=True)
    gen, per_sender = build(args.txs, args.senders)
    blocks = make_blocks(gen, per_sender, 1000)
    rows = []
    for r in range(args.rounds):
        v = verify_only(per_sender)
        with tempfile.TemporaryDirectory(prefix="prsm-bench-") as d:
            a, block_ms = trio.run(apply_path, gen, blocks, Path(d))
        with tempfile.TemporaryDirectory(prefix="prsm-bench-") as d:
            p, produced = trio.run(full_path, gen, per_sender, Path(d), args.submitters)
        rows.append((v, a, p, block_ms))
        print(
            f"round {r + 1}: verify-only {v:,.0f} tx/s | apply {a:,.0f} tx/s ({a / v:.0%}) | "
            f"admit+produce {p:,.0f} tx/s ({p / v:.0%}, {len(produced)} blocks) | "
            f"1,000-tx block apply+commit p50 {statistics.median(block_ms):.1f} ms",
            flush=True,
        )
    med = statistics.median
    all_ms = sorted(ms for *_, block in rows for ms in block)
    print()
    print(f"verification only, 1 thread   {med([r[0] for r in rows]):>8,.0f} tx/s")
    print(f"apply (sync path)             {med([r[1] for r in rows]):>8,.0f} tx/s   "
          f"ratio {med([r[1] / r[0] for r in rows]):.0%}   target >= 70%")
    print(f"admit + produce (validator)   {med([r[2] for r in rows]):>8,.0f} tx/s   "
          f"ratio {med([r[2] / r[0] for r in rows]):.0%}")
    print(
        f"1,000-tx block, excl. verification: p50 {med(all_ms):.1f} ms, "
        f"p99 {all_ms[int(0.99 * (len(all_ms) - 1))]:.1f} ms, max {all_ms[-1]:.1f} ms   target < 100 ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
