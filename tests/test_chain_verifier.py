"""The signature verifier: batched checks in a worker process (large batches), a thread
(middle-sized ones) or on the event loop (a few signatures) give the same answers as checking
one by one; a dead worker falls back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import msgpack
import nacl.signing
import trio

from prsm_node.chain.verifier import INLINE_MAX_BATCH, PROCESS_MIN_BATCH, SignatureVerifier, signatures_valid
from prsm_node.ledger import Settle, Transfer, sign_receipt, sign_tx
from prsm_node.ledger.types import Tx

CHAIN = "prsm-test-verifier"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(3)]


def txs(count: int, bad: set[int]) -> list[Tx]:
    out = []
    for i in range(count):
        tx = sign_tx(KEYS[i % 2], chain_id=CHAIN, nonce=i, fee=0, body=Transfer(b"\x09" * 32, i + 1))
        if i in bad:
            tx = dataclasses.replace(tx, signature=bytes(64))
        out.append(tx)
    return out


async def test_large_batches_go_to_the_worker_process_and_agree() -> None:
    size = 4 * PROCESS_MIN_BATCH + 40
    middle = 2 * PROCESS_MIN_BATCH
    batch = txs(size, bad={3, middle, size - 1})
    verifier = SignatureVerifier()
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        with trio.fail_after(30):
            assert await verifier.first_invalid(batch) == 3
            assert await verifier.first_invalid(batch[4:]) == middle - 4
            assert await verifier.first_invalid(batch[middle + 1 :]) == size - middle - 2
            assert verifier.in_process >= 3 * PROCESS_MIN_BATCH
            # Several large batches in flight at once come back each to its own caller.
            results: dict[int, int | None] = {}

            async def check(start: int) -> None:
                results[start] = await verifier.first_invalid(batch[start:])

            async with trio.open_nursery() as inner:
                for start in (0, 4, middle + 1, 10, middle - 1):
                    inner.start_soon(check, start)
            assert results == {0: 3, 4: middle - 4, middle + 1: size - middle - 2, 10: middle - 10, middle - 1: 1}
            # One by one through the queue: a signature each, checked on the event loop (a
            # hand-off to a thread or the process would cost more than the check).
            in_process, inline = verifier.in_process, verifier.inline
            assert [await verifier.verify(t) for t in batch[:5]] == [True, True, True, False, True]
            assert (verifier.in_process, verifier.inline) == (in_process, inline + 5)
            # Middle-sized: in a thread (neither counter moves).
            assert await verifier.first_invalid(batch[: INLINE_MAX_BATCH + 5]) == 3
            assert (verifier.in_process, verifier.inline) == (in_process, inline + 5)
        # A settlement whose receipt is forged fails as a whole.
        payee = bytes(KEYS[0].verify_key)
        receipt = sign_receipt(KEYS[2], receipt_id=b"\x01" * 32, payee=payee, amount=5, chain_id=CHAIN)
        forged = dataclasses.replace(receipt, amount=6)
        good = sign_tx(KEYS[0], chain_id=CHAIN, nonce=0, fee=0, body=Settle((receipt,)))
        bad = sign_tx(KEYS[0], chain_id=CHAIN, nonce=0, fee=0, body=Settle((forged,)))
        assert signatures_valid(good) and not signatures_valid(bad)
        with trio.fail_after(30):
            assert await verifier.first_invalid([good] * PROCESS_MIN_BATCH + [bad]) == PROCESS_MIN_BATCH

        # Kill the worker: the next large batch is checked in a thread, with the same answer.
        assert verifier._worker is not None  # noqa: SLF001 - the test reaches in to kill it
        verifier._worker._process.kill()  # noqa: SLF001
        with trio.fail_after(30):
            assert await verifier.first_invalid(batch) == 3
            assert await verifier.first_invalid(batch) == 3  # and a new worker takes over
        nursery.cancel_scope.cancel()


def test_worker_process_protocol_and_exit_on_eof() -> None:
    batch = txs(3, bad={1})
    from prsm_node.ledger.batchverify import triples_of

    triples = [list(t) for tx in batch for t in triples_of(tx)]
    body = msgpack.packb(triples)
    proc = subprocess.run(
        [sys.executable, "-m", "prsm_node.ledger.verify_worker"],
        input=len(body).to_bytes(4, "big") + body,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"\x00\x00\x00\x03\x01\x00\x01"
