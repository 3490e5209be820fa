"""Write protocols/task-vectors.json: /prsm/task/1.0.0 messages built from fixed keys, so another
implementation can check its encoding, its authorisation payload and its receipt derivation.

    python scripts/gen_task_vectors.py [--check]
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _vectors import write_or_check  # noqa: E402 - scripts/ is on sys.path

from prsm_node.agents import task_messages as m  # noqa: E402
from prsm_node.agents.inputs import Usage  # noqa: E402
from prsm_node.agents.pricing import charge_for  # noqa: E402
from prsm_node.agents.task import expected_receipts, sign_auth  # noqa: E402
from prsm_node.keys import NodeKey  # noqa: E402
from prsm_node.ledger.signing import sign_receipt  # noqa: E402

OUT = ROOT / "protocols" / "task-vectors.json"


def vectors() -> dict[str, object]:
    payer, executor, publisher = NodeKey(b"\x01" * 32), NodeKey(b"\x02" * 32), NodeKey(b"\x03" * 32)
    chain, model, task = "prsm-vectors", b"\x0a" * 32, b"\x0b" * 32
    auth = sign_auth(payer, m.Authorisation(payer.account, executor.account, model, task, chain, 10**15, 1_900_000_000))
    run = m.Run(model, {"prompt": "The Rays of Light", "max_new_tokens": 8, "temperature": 0.0}, auth)
    usage = Usage(17, 8, 1.5, 1, "cpu")
    charge = charge_for(25, 10**12, auth.max_amount, royalty=Fraction(1, 10), payer=payer.account,
                        executor=executor.account, publisher=publisher.account)
    result = m.Result(task, " the Light", usage, charge)
    receipts = tuple(sign_receipt(payer.signing_key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount,
                                  chain_id=chain)
                     for r in expected_receipts(task, payer.account, executor.account, charge, chain))
    batch_auth = sign_auth(payer, m.Authorisation(payer.account, executor.account, model, b"\x0c" * 32, chain,
                                                  2 * 10**15, 1_900_000_000))
    run_batch = m.RunBatch(model, ({"text": "Of the Colours"}, {"prompt": "not a classifier input"}), batch_auth)
    batch_usage = Usage(48, 0, 0.75, 1, "cpu")
    batch_charge = charge_for(48, 10**12, batch_auth.max_amount, royalty=Fraction(1, 10), payer=payer.account,
                              executor=executor.account, publisher=publisher.account)
    batch_result = m.BatchResult(batch_auth.task_id, (
        m.ItemResult({"book-i": 0.75, "book-ii": 0.25}, batch_usage),
        m.ItemError("invalid_input", "unknown input key(s) ['prompt']"),
    ), batch_charge)
    return {
        "keys": {"payer_seed": "01" * 32, "executor_seed": "02" * 32, "publisher_seed": "03" * 32},
        "auth_signing_payload": auth.signing_payload().hex(),
        "receipt_ids": [r.hex() for r in m.receipt_ids(task)],
        "charge": {"units": charge.units, "price_per_unit": str(charge.price_per_unit), "amount": str(charge.amount),
                   "executor_amount": str(charge.executor_amount), "publisher_amount": str(charge.publisher_amount)},
        "messages": {
            "list": m.encode_request(m.ListModels()).hex(),
            "run": m.encode_request(run).hex(),
            "result": m.encode_reply(result).hex(),
            "pay": m.encode_request(m.Pay(task, receipts)).hex(),
            "paid": m.encode_reply(m.Paid(task)).hex(),
            "error": m.encode_error("busy", "4 tasks of this peer are running").hex(),
            "run_batch": m.encode_request(run_batch).hex(),
            "batch_result": m.encode_reply(batch_result).hex(),
        },
        "batch_auth_signing_payload": batch_auth.signing_payload().hex(),
    }


def main(argv: list[str]) -> int:
    return write_or_check(OUT, json.dumps(vectors(), indent=2) + "\n", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
