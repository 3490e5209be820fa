"""Run the seeded PBFT simulation (prsm_node/consensus/sim.py) for many seeds.

    python scripts/pbft_sim.py                    # seeds 0..199
    python scripts/pbft_sim.py --seeds 5000 --start 200
    python scripts/pbft_sim.py --seed 1630 -v     # one seed, with its scenario and figures

Prints a summary (seeds, failures, CPU time, messages, view changes, evidence, state
transfers) and every failing seed with its scenario and violations; exits 1 on a failure.
Even seeds run n = 4, odd seeds n = 7 (``--n`` forces one size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prsm_node.consensus.sim import Scenario, Simulation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run only this seed")
    parser.add_argument("--n", type=int, choices=(4, 7), help="force the number of validators")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per seed")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    failures = 0
    totals = {"messages": 0, "view_changes": 0, "evidence": 0, "rejected": 0, "state_transfers": 0, "delivered": 0}
    started = time.process_time()
    for seed in seeds:
        t0 = time.process_time()
        result = Simulation(Scenario.from_seed(seed, args.n)).run()
        totals["messages"] += result.messages
        totals["view_changes"] += max(result.views)
        totals["evidence"] += result.evidence
        totals["rejected"] += result.rejected
        totals["state_transfers"] += result.state_transfers
        totals["delivered"] += result.delivered
        if args.verbose or not result.ok:
            print(
                f"seed {seed}: {'ok' if result.ok else 'FAIL'} n={result.scenario.n} "
                f"byzantine={result.scenario.byzantine} views={result.views} delivered={result.delivered} "
                f"evidence={result.evidence} transfers={result.state_transfers} end={result.end_time:.1f}s "
                f"cpu={time.process_time() - t0:.2f}s trace={result.trace_hash[:16]}"
            )
        if not result.ok:
            failures += 1
            print(f"  scenario: {result.scenario}")
            for v in result.violations:
                print(f"  violation: {v}")
    cpu = time.process_time() - started
    figures = " ".join(f"{k}={v}" for k, v in totals.items())
    per_seed = cpu / max(len(seeds), 1) * 1000
    print(f"{len(seeds)} seeds, {failures} failed, {cpu:.1f}s CPU ({per_seed:.0f} ms/seed); {figures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
