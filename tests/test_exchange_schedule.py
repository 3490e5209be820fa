"""The schedule's ramp (how many providers work at once) and coverage rule, driven with
synthetic byte counts and clock values: pure bookkeeping, no network, no timing."""

from __future__ import annotations

from libp2p.peer.id import ID

from prsm_node.exchange.schedule import FetchParams, Provider, Schedule

CHUNKS = 40


def schedule(names: str, *, ramp_bytes: int = 100,
             have: dict[str, range] | None = None) -> tuple[Schedule, dict[str, Provider]]:
    sched = Schedule(FetchParams(ramp_bytes=ramp_bytes, ramp_gain=0.1), 1, lambda: None)
    providers = {}
    for n in names:
        p = Provider(ID(n.encode()), set((have or {}).get(n, range(CHUNKS))))
        sched.providers[p.peer] = providers[n] = p
    sched.start(list(range(CHUNKS)))
    return sched, providers


def activate(sched: Schedule) -> list[Provider]:
    out = sched.to_activate()
    for p in out:  # what Fetch._activate does, one worker each
        sched.workers += 1
        p.workers += 1
    return out


def test_the_ramp_adds_providers_while_the_rate_rises_then_parks_the_last() -> None:
    sched, p = schedule("abc")
    assert activate(sched) == [p["a"]]  # one provider to begin with
    sched.received(10, now=0.0)  # the first bytes only start the clock
    sched.received(50, now=0.5)
    assert sched.to_activate() == [] and sched.ramp_steps == []  # window not full yet
    sched.received(50, now=1.0)  # 100 B/s with one
    assert sched.ramp_steps == [(1, 100.0)] and sched.target == 2
    assert activate(sched) == [p["b"]]
    sched.received(100, now=1.5)  # 200 B/s with two: it rose, a third
    assert activate(sched) == [p["c"]]
    sched.received(100, now=2.0)  # still 200 B/s with three: the third did not help
    assert sched.ramp_settled and sched.target == 2 and p["c"].parked
    assert [n for n, _ in sched.ramp_steps] == [1, 2, 3]
    sched.stopped(p["c"])  # its worker finished its batch
    assert not p["c"].active and activate(sched) == []
    sched.received(10_000, now=2.1)  # settled: no more steps
    assert len(sched.ramp_steps) == 3
    sched.drop(p["a"], "test")  # a dropped provider's place goes to the idle one
    assert activate(sched) == [p["c"]] and not p["c"].parked


def test_a_provider_that_does_not_raise_the_rate_is_parked_at_once() -> None:
    sched, p = schedule("ab")
    activate(sched)
    sched.received(1, now=0.0)
    sched.received(100, now=1.0)
    assert activate(sched) == [p["b"]]
    sched.received(100, now=1.95)  # 105 B/s: under 100 x (1 + 0.1)
    assert sched.ramp_settled and sched.target == 1 and p["b"].parked and not p["a"].parked


def test_a_settled_ramp_reopens_when_the_rate_falls_well_below_the_settled_rate() -> None:
    sched, p = schedule("abc")
    activate(sched)
    sched.received(1, now=0.0)
    sched.received(100, now=1.0)  # 100 B/s with a
    assert activate(sched) == [p["b"]]
    sched.received(100, now=1.95)  # 105 B/s: b did not help, parked; settled at 100 B/s with a
    assert sched.ramp_settled and sched.target == 1 and p["b"].parked
    sched.stopped(p["b"])  # its worker finished its batch
    sched.received(100, now=3.0)  # 95 B/s: the usual wobble, nothing changes
    sched.received(100, now=4.6)  # 62 B/s: lower, still above half
    assert sched.ramp_settled and activate(sched) == [] and sched.ramp_reopened == 0
    sched.received(100, now=7.1)  # 40 B/s: a slowed down to under half the settled rate
    assert not sched.ramp_settled and sched.target == 2 and sched.ramp_reopened == 1
    assert activate(sched) == [p["b"]] and not p["b"].parked  # the idle ones get another try
    sched.received(100, now=8.1)  # 100 B/s with a and b: it rose, a third
    assert sched.target == 3 and activate(sched) == [p["c"]]
    sched.received(100, now=9.1)  # still 100 B/s: c parked, settled anew at 100 B/s with two
    assert sched.ramp_settled and sched.target == 2 and p["c"].parked
    assert [n for n, _ in sched.ramp_steps] == [1, 2, 1, 2, 3]


def test_a_ramp_settled_anew_at_a_lower_rate_watches_that_rate() -> None:
    sched, p = schedule("ab")
    activate(sched)
    sched.received(1, now=0.0)
    sched.received(100, now=1.0)  # 100 B/s
    activate(sched)
    sched.received(100, now=2.0)  # 100 B/s with b too: b parked
    sched.stopped(p["b"])
    sched.received(100, now=6.0)  # 25 B/s: reopened
    assert activate(sched) == [p["b"]]
    sched.received(100, now=10.0)  # 25 B/s with two: no better, b parked again; settled at 25 B/s
    assert sched.ramp_settled and sched.target == 1 and p["b"].parked
    sched.stopped(p["b"])
    sched.received(100, now=14.5)  # 22 B/s: not well below the new settled rate
    assert sched.ramp_settled and sched.ramp_reopened == 1


def test_the_ramp_settles_when_no_idle_provider_is_left() -> None:
    sched, p = schedule("a")
    activate(sched)
    sched.received(1, now=0.0)
    sched.received(100, now=1.0)
    assert sched.ramp_settled and sched.target == 1 and activate(sched) == []


def test_chunks_only_an_idle_provider_holds_activate_it_beyond_the_ramp() -> None:
    sched, p = schedule("abc", have={"a": range(0, 20), "b": range(20, 40), "c": range(10, 30)})
    got = activate(sched)
    assert sched.target == 1 and got == [p["a"], p["b"]]  # b: chunks 20..39 only it (and c) hold
    assert not p["c"].active


def test_without_a_ramp_every_provider_starts_at_once() -> None:
    sched, p = schedule("abcde", ramp_bytes=0)
    assert sched.ramp_settled and len(activate(sched)) == 4  # parallel_peers
