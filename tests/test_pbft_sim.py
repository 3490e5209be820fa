"""The seeded PBFT simulation: safety and liveness under drops, delays, duplicates, reordering,
crashes/restarts and Byzantine validators, for many seeds; and determinism per seed.

CI runs ``PRSM_PBFT_CI_SEEDS`` seeds (default 200, alternating n = 4 and n = 7) in the normal
suite, well under a minute of CPU. The ``slow`` test runs ``PRSM_PBFT_SEEDS`` more, starting
after those: 50 by default, so CI runs it bounded; ``PRSM_PBFT_SEEDS=5000`` for thousands.
To rerun one failing seed: ``python scripts/pbft_sim.py --seed N``.
"""

from __future__ import annotations

import pytest

from prsm_node.consensus.sim import Scenario, Simulation, run_seed

from .conftest import env_int


def _run(seeds: range) -> None:
    failures = []
    for seed in seeds:
        result = run_seed(seed)
        if not result.ok:
            failures.append(f"seed {seed} ({result.scenario}): {result.violations[:3]}")
    assert not failures, "\n".join(failures)


def test_ci_seeds() -> None:
    _run(range(env_int("PRSM_PBFT_CI_SEEDS", 200)))


@pytest.mark.slow
def test_many_seeds() -> None:
    start = env_int("PRSM_PBFT_CI_SEEDS", 200)
    _run(range(start, start + env_int("PRSM_PBFT_SEEDS", 50)))


def test_same_seed_same_run() -> None:
    for seed in (5, 12):  # an equivocating pair of n = 7 validators; crashes with n = 4
        a, b = run_seed(seed), run_seed(seed)
        assert a.ok and b.ok
        assert a.trace_hash == b.trace_hash
        assert (a.messages, a.delivered, a.evidence) == (b.messages, b.delivered, b.evidence)
    assert run_seed(5).trace_hash != run_seed(7).trace_hash


def test_the_seeds_cover_every_fault() -> None:
    """The CI seeds include each Byzantine mode at both sizes, crashes, and heavy drops."""
    scenarios = [Scenario.from_seed(s) for s in range(env_int("PRSM_PBFT_CI_SEEDS", 200))]
    modes = {(sc.n, mode) for sc in scenarios for _, mode in sc.byzantine}
    assert modes == {(n, m) for n in (4, 7) for m in ("silent", "badsig", "equivocate")}
    assert any(sc.crashes >= 2 for sc in scenarios)
    assert any(sc.drop >= 0.3 for sc in scenarios)
    assert any(len(sc.byzantine) == 2 for sc in scenarios)


def test_an_equivocating_primary_is_caught_and_safety_holds() -> None:
    sc = Scenario(
        seed=1000, n=4, byzantine=((0, "equivocate"),), fault_until=6.0, drop=0.0, duplicate=0.0,
        max_delay=0.05, crashes=0, requests=12,
    )
    result = Simulation(sc).run()
    assert result.ok, result.violations
    assert result.evidence > 0
    assert result.delivered >= 12


def test_a_silent_primary_is_replaced() -> None:
    sc = Scenario(
        seed=1001, n=7, byzantine=((0, "silent"), (1, "silent")), fault_until=4.0, drop=0.1, duplicate=0.1,
        max_delay=0.2, crashes=1, requests=8,
    )
    result = Simulation(sc).run()
    assert result.ok, result.violations
    assert min(v for i, v in enumerate(result.views) if i > 1) >= 2  # two silent primaries skipped
