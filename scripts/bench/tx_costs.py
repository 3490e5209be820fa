"""Where a validator's CPU goes per committed transfer, stage by stage, beside one Ed25519
verification measured in the same run: the budget that bounds ``consensus.py``'s commit rate.

Each stage is the daemon's own code, timed in this process on one core over blocks of
``--block`` transfers from ``--accounts`` senders (no network, no other process):

- **verify**: ``verify_tx_signature`` (what the ceiling counts, on every validator);
- **control**: a ``ledger.submit_many`` request's hex decoded and ``decode_tx`` (entry node);
- **admit**: ``Mempool.precheck`` + ``Mempool.add`` (signature already checked);
- **forward**: a SUBMIT_MANY frame encoded and decoded with ``decode_tx`` (every other
  validator receives each tx this way once);
- **propose**: the primary picking the batch from the mempool (``propose_txs``);
- **execute**: ``execute_batch`` with the txs known from the mempool (every validator);
- **store**: ``LedgerStore.commit`` of the block, synced (every validator);
- **retire**: removing the block's txs from the mempool.

Per validator a tx costs verify + admit + forward-or-control + execute + store + retire (+
propose on the primary), so with V validators on C cores the commit rate is at most
C / (V x that sum): printed beside the ceiling C / (V x verify).

    python scripts/bench/tx_costs.py [--block 1000] [--accounts 400] [--blocks 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from prsm_node.chain import messages as m  # noqa: E402
from prsm_node.consensus.blocks import Executed, encode_meta, execute_batch  # noqa: E402
from prsm_node.genesis import Genesis  # noqa: E402
from prsm_node.ledger import Transfer, Tx, decode_tx, encode_tx, sign_tx, tx_hash  # noqa: E402
from prsm_node.ledger.block import Certificate, sign_commit  # noqa: E402
from prsm_node.ledger.mempool import Mempool  # noqa: E402
from prsm_node.ledger.signing import verify_tx_signature  # noqa: E402
from prsm_node.ledger.storage import LedgerStore, Tip  # noqa: E402
from prsm_node.store import Store  # noqa: E402

CHAIN = "prsm-bench-costs"


STAGES = ("verify", "control", "admit", "forward", "propose", "execute", "store", "retire")


class Bench:
    """One ledger (LevelDB in a temp dir) and mempool, fed blocks of signed transfers."""

    def __init__(self, tmp: Path, senders: int) -> None:
        self.keys = [nacl.signing.SigningKey(os.urandom(32)) for _ in range(senders)]
        self.accounts = [bytes(k.verify_key) for k in self.keys]
        self.nonces = [0] * senders
        self.proposer = nacl.signing.SigningKey(os.urandom(32))
        balances = {a.hex(): str(10**24) for a in self.accounts}
        self.genesis = Genesis(chain_id=CHAIN, network="bench", genesis_time=0, balances=balances)
        self.store = Store(tmp / "db")
        self.store.open()
        self.ledger = LedgerStore(self.store.namespace("ledger"), self.genesis)
        self.state, self.tip = self.ledger.load()
        self.pool = Mempool(self.state, max_txs=10**6, max_per_sender=10**6)
        self.stages: dict[str, list[float]] = {k: [] for k in STAGES}
        self.sent = 0

    def signed(self, count: int) -> list[Tx]:
        txs = []
        for _ in range(count):
            a = self.sent % len(self.keys)
            self.sent += 1
            to = self.accounts[(a + 1) % len(self.keys)]
            txs.append(sign_tx(self.keys[a], chain_id=CHAIN, nonce=self.nonces[a], fee=0, body=Transfer(to, 1)))
            self.nonces[a] += 1
        return txs

    def block(self, txs: list[Tx]) -> None:
        state, pool, tip, n = self.state, self.pool, self.tip, len(txs)
        raw = [encode_tx(tx) for tx in txs]
        self.time("verify", n, lambda: [verify_tx_signature(tx) for tx in txs])
        request = json.dumps({"method": "ledger.submit_many", "params": {"txs": [r.hex() for r in raw]}})
        self.time("control", n, lambda: [decode_tx(bytes.fromhex(h)) for h in json.loads(request)["params"]["txs"]])

        def admit() -> None:
            for refused, tx in zip(pool.precheck(txs), txs, strict=True):
                assert refused is None
                pool.add(tx, verified=True)

        self.time("admit", n, admit)
        frame = m.encode_submit_many(raw)
        self.time("forward", n, lambda: [decode_tx(t) for t in m.decode_tx_request(frame).txs])  # type: ignore[union-attr]
        proposer = self.accounts[0]

        def propose() -> None:  # ChainService.propose_txs: the mempool's first txs, as they are
            size = 0
            for entry in pool.select_pending(n):
                size += len(entry.encoded)

        self.time("propose", n, propose)
        batch = [encode_meta(proposer, tip.time_ms + 1), *raw]

        def known(digest: bytes) -> Tx | None:
            entry = pool.get(digest)
            return entry.tx if entry is not None else None

        done: list[Executed] = []
        self.time("execute", n, lambda: done.append(execute_batch(
            state, batch, prev_hash=tip.hash, prev_time_ms=tip.time_ms, null_proposer=proposer, known=known
        )))  # fmt: skip
        executed = done[0]
        assert len(executed.included) == n, "every transfer applies"
        cert = Certificate((sign_commit(self.proposer, executed.block),))

        def commit() -> None:
            state.check_block_supply()
            self.ledger.commit(executed.block, cert, executed.included, state.changes())
            state.checkpoint()

        self.time("store", n, commit)

        def retire() -> None:
            pool.discard([tx_hash(tx) for tx in txs])
            pool.reconcile()

        self.time("retire", n, retire)
        header = executed.block.header
        self.tip = Tip(header.height, executed.block.hash(), header.time_ms)

    def time(self, stage: str, n: int, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        fn()
        self.stages[stage].append((time.perf_counter() - t) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=1000, help="transfers per block")
    ap.add_argument("--accounts", type=int, default=400, help="senders")
    ap.add_argument("--blocks", type=int, default=5, help="blocks timed (medians over them)")
    ap.add_argument("--validators", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="prsm-bench-costs-") as tmp:
        bench = Bench(Path(tmp), args.accounts)
        try:
            for _ in range(args.blocks):
                bench.block(bench.signed(args.block))
        finally:
            bench.store.close()

    med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in bench.stages.items()}
    print(f"per tx, median over {args.blocks} blocks of {args.block} transfers from {args.accounts} senders (us):")
    for k, v in med.items():
        print(f"  {k:>8} {v:8.1f}")
    cores = os.cpu_count() or 1
    v = args.validators
    backup = med["verify"] + med["admit"] + med["forward"] + med["execute"] + med["store"] + med["retire"]
    entry = backup - med["forward"] + med["control"]
    primary = backup + med["propose"]
    # every tx: one entry validator (control), the others forwarded; the primary proposes
    total = entry + (v - 1) * backup + med["propose"]
    print(f"per validator: backup {backup:.0f} us, entry {entry:.0f} us, primary {primary:.0f} us per tx")
    print(f"all {v} validators: {total:.0f} us per committed tx, of which verification {v * med['verify']:.0f} us")
    bound, ceiling = cores / (total * 1e-6), cores / (v * med["verify"] * 1e-6)
    print(f"bound from these stages alone: {cores} cores / {total:.0f} us = {bound:,.0f} tx/s "
          f"= {100 * bound / ceiling:.0f}% of the {ceiling:,.0f} tx/s ceiling (network, PBFT messages and the "
          f"event loop come on top)")  # fmt: skip


if __name__ == "__main__":
    main()
