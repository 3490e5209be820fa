"""NWTN end to end on a local devnet: train the three Opticks models, publish each on its own node,
and ask a node that hosts none of them. Prints the answer, the trace and the balances.

    python scripts/demo_nwtn.py [--tiny] [--nodes 4] [--query "..."] [--budget 1]

node0 (the devnet's validator) asks; node1, node2, node3 publish the embedder, the classifier
and the language model; node1 also fetches the language model, so it has two providers (node1
runs it, node3 receives the publisher's royalty). Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prsm_node.control.client import call  # noqa: E402
from prsm_node.ledger.types import format_amount  # noqa: E402

CLI = [sys.executable, "-m", "prsm_node"]
MODELS = ("opticks-embedder", "opticks-classifier", "opticks-lm")


def control(node: dict[str, Any], method: str, timeout: float = 120, **params: Any) -> Any:
    return call(Path(node["home"]), method, params, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models (a few seconds of training)")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--query", default="Why do thin plates of Light show colours?")
    p.add_argument("--budget", default="1")
    args = p.parse_args(argv)
    if args.nodes < 4:
        p.error("--nodes must be at least 4: one asker and one publisher per model")
    work = Path(tempfile.mkdtemp(prefix="nwtn-"))
    models = work / "models"
    print(f"training into {models} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_models.py"), str(models),
                    *(["--tiny"] if args.tiny else [])], check=True, stdout=subprocess.DEVNULL)
    devnet = subprocess.Popen([*CLI, "devnet", "--nodes", str(args.nodes), "--dir", str(work / "net"), "--json"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert devnet.stdout is not None
        nodes = json.loads(devnet.stdout.readline())["nodes"]
        ids = {}
        for node, name in zip(nodes[1:4], MODELS, strict=True):
            doc = json.loads((models / name / "spec.json").read_text())
            res = control(node, "model.publish", path=str(models / name), name=name, version="1",
                          tags=doc["tags"], metadata={"architecture": doc["architecture"]})
            ids[name] = res["id"]
            print(f"node{nodes.index(node)} published {name} {res['id'][:16]}")
        control(nodes[1], "model.fetch", ref=ids["opticks-lm"], timeout=300)
        print("node1 fetched opticks-lm (a second provider)")
        before = [control(n, "ledger.balance") for n in nodes[:4]]
        answer = control(nodes[0], "agents.ask", timeout=300, query=args.query, budget=args.budget)
        print("\n" + answer["answer"] + "\n")
        print(f"cost {answer['cost_ftns']} FTNS (estimate {format_amount(int(answer['estimate']))}), "
              f"in {answer['ms']} ms")
        for row in answer["trace"]:
            print(f"  {row['subtask']:<9} {row['model'] or '-':<20} {(row['peer'] or '-')[:20]:<20} "
                  f"{row['ms']:>8} ms {row['units']:>6} units {row['cost_ftns']} FTNS {row['error'] or ''}")
        for n in nodes[1:4]:  # wait until each executor and publisher has settled its receipts
            control(n, "agents.status")
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = [control(n, "agents.status")["tasks"] for n in nodes[1:4]]
            if all(h["receipts_to_settle"] == 0 and h["receipts_to_forward"] == 0 for h in held):
                break
            time.sleep(0.5)
        after = [control(n, "ledger.balance") for n in nodes[:4]]
        print("\nbalances (before -> after):")
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            change = int(a["balance"]["units"]) - int(b["balance"]["units"])
            sign = "+" if change >= 0 else "-"
            print(f"  node{i}  {b['balance']['ftns']} -> {a['balance']['ftns']} FTNS "
                  f"({sign}{format_amount(abs(change))})")
        return 0
    finally:
        devnet.send_signal(signal.SIGINT)
        try:
            devnet.wait(timeout=30)
        except subprocess.TimeoutExpired:
            devnet.kill()
        if os.environ.get("NWTN_KEEP") is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
