"""The PBFT replica's pure pieces, driven by hand over a synchronous in-memory cluster."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.consensus import (
    Checkpoint,
    Commit,
    InvalidNewView,
    Kind,
    NewView,
    OEntry,
    PbftParams,
    Prepare,
    PreparedCert,
    PrePrepare,
    ProposalRefused,
    StableRecord,
    ViewChange,
    VoteRecord,
    batch_digest,
    decode,
    encode,
    prune_records,
    verify_commit_certificate,
)
from prsm_node.consensus.certs import GENESIS_STATE_DIGEST
from prsm_node.consensus.messages import Status
from prsm_node.consensus.replica import RETRANSMIT_REQUESTS, ROUND_TIMEOUT_FACTOR
from prsm_node.consensus.sim import TEST_CHAIN_ID, Cluster, make_validators, sign_as
from prsm_node.consensus.viewchange import check_new_view, plan_new_view

P = PbftParams.for_tests()  # K = 4, L = 8, timeout 1 s doubling to 8 s


def digest(batch: tuple[bytes, ...]) -> bytes:
    return batch_digest(TEST_CHAIN_ID, batch)


# ------------------------------------------------------------ normal case


def test_normal_case_commits_in_order_with_certificates() -> None:
    c = Cluster()
    for k in range(3):
        c.propose(0, b"tx-%d" % k)
    c.deliver_all()
    for i in range(4):
        assert c.delivered[i] == [(1, (b"tx-0",)), (2, (b"tx-1",)), (3, (b"tx-2",))]
    cert = c.replicas[2]._commits[3]
    verify_commit_certificate(c.vs, cert, digest((b"tx-2",)))
    assert len(cert.commits) == c.vs.quorum == 3


def test_a_backup_cannot_propose_and_a_full_window_refuses() -> None:
    c = Cluster()
    with pytest.raises(ProposalRefused):
        c.propose(1, b"x")
    c.filter = lambda src, dst, m: False  # nothing commits: the window fills up
    for k in range(P.log_window):
        c.propose(0, b"tx-%d" % k)
    assert not c.replicas[0].can_propose()
    with pytest.raises(ProposalRefused):
        c.propose(0, b"one too many")


def test_watermarks_drop_pre_prepares_outside_the_window() -> None:
    c = Cluster()
    vs = c.vs
    for seq in (0, P.log_window + 1):
        batch = (b"far",)
        pp = sign_as(PrePrepare(vs.primary(0), 0, seq, digest(batch), batch), 0)
        step = c.replicas[1].receive(encode(pp), 0.0)
        assert not step.messages and not step.records
    pp = sign_as(PrePrepare(vs.primary(0), 0, P.log_window, digest((b"edge",)), (b"edge",)), 0)
    assert [decode(m.data).kind for m in c.replicas[1].receive(encode(pp), 0.0).messages] == [Kind.PREPARE]


# ------------------------------------------------------------ quorum counting


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([1, 2, 3]), min_size=0, max_size=12))
def test_a_sender_counts_once(senders: list[int]) -> None:
    """Replica 1 prepares (v0, seq 1) once it has its own PREPARE and one more distinct
    backup's (2f = 2 with n = 4); repeated prepares of one sender never add up."""
    c = Cluster()
    r = c.replicas[1]
    batch = (b"q",)
    pp = sign_as(PrePrepare(c.keys[0], 0, 1, digest(batch), batch), 0)
    r.receive(encode(pp), 0.0)
    for s in senders:
        step = r.receive(encode(sign_as(Prepare(c.keys[s], 0, 1, digest(batch)), s)), 0.0)
        assert not step.evidence
    others = set(senders) - {1}
    assert r._slots[1].prepared == bool(others)
    assert len(r._slots[1].prepares) == len(set(senders) | {1})


def test_commit_needs_a_quorum_of_distinct_senders() -> None:
    c = Cluster()
    r = c.replicas[3]
    batch = (b"c",)
    d = digest(batch)
    r.receive(encode(sign_as(PrePrepare(c.keys[0], 0, 1, d, batch), 0)), 0.0)
    for _ in range(3):
        assert not r.receive(encode(sign_as(Commit(c.keys[1], 0, 1, d), 1)), 0.0).committed
    assert not r.receive(encode(sign_as(Commit(c.keys[2], 0, 1, d), 2)), 0.0).committed
    step = r.receive(encode(sign_as(Commit(c.keys[0], 0, 1, d), 0)), 0.0)
    assert [b.seq for b in step.committed] == [1]


# ------------------------------------------------------------ evidence


def test_equivocation_is_kept_as_evidence() -> None:
    c = Cluster()
    r = c.replicas[1]
    a, b = (b"a",), (b"b",)
    pp_a = sign_as(PrePrepare(c.keys[0], 0, 1, digest(a), a), 0)
    pp_b = sign_as(PrePrepare(c.keys[0], 0, 1, digest(b), b), 0)
    r.receive(encode(pp_a), 0.0)
    step = r.receive(encode(pp_b), 0.0)
    assert len(step.evidence) == 1
    ev = step.evidence[0]
    assert ev.sender == c.keys[0]
    assert decode(ev.first).digest == digest(a) and decode(ev.second).digest == digest(b)  # type: ignore[union-attr]
    assert not step.messages  # no PREPARE for the second one

    p1 = sign_as(Prepare(c.keys[2], 0, 1, digest(a)), 2)
    p2 = sign_as(Prepare(c.keys[2], 0, 1, digest(b)), 2)
    r.receive(encode(p1), 0.0)
    assert [e.sender for e in r.receive(encode(p2), 0.0).evidence] == [c.keys[2]]
    c1 = sign_as(Commit(c.keys[3], 0, 1, digest(a)), 3)
    c2 = sign_as(Commit(c.keys[3], 0, 1, digest(b)), 3)
    r.receive(encode(c1), 0.0)
    assert [e.sender for e in r.receive(encode(c2), 0.0).evidence] == [c.keys[3]]
    cp1 = sign_as(Checkpoint(c.keys[2], 4, b"\1" * 32), 2)
    cp2 = sign_as(Checkpoint(c.keys[2], 4, b"\2" * 32), 2)
    r.receive(encode(cp1), 0.0)
    assert len(r.receive(encode(cp2), 0.0).evidence) == 1
    assert not r.receive(encode(p2), 0.0).evidence  # reported once


# ------------------------------------------------------------ checkpoints and GC


def test_checkpoints_become_stable_and_collect_garbage() -> None:
    c = Cluster()
    for k in range(P.checkpoint_interval + 1):
        c.propose(0, b"tx-%d" % k)
    c.deliver_all()
    for r in c.replicas:
        assert r.stable_seq == P.checkpoint_interval
        assert all(s > P.checkpoint_interval for s in r._slots)
        assert all(s > P.checkpoint_interval for s in r._prepared)
        assert r.high_watermark == P.checkpoint_interval + P.log_window
    records = c.records[1]
    assert any(isinstance(x, StableRecord) for x in records)
    pruned = prune_records(records)
    assert len(pruned) < len(records)
    assert all(getattr(x, "seq", P.checkpoint_interval + 1) >= P.checkpoint_interval for x in pruned)


def test_a_lagging_replica_asks_for_state_transfer() -> None:
    c = Cluster()
    c.down.add(3)
    for k in range(2 * P.checkpoint_interval):
        c.propose(0, b"tx-%d" % k)
    c.deliver_all()
    assert c.replicas[0].stable_seq == 2 * P.checkpoint_interval
    c.down.clear()
    lagging = c.replicas[3]
    # The others' checkpoints reach it (here: replayed by hand, as STATUS answers would).
    for i in range(3):
        cp = sign_as(Checkpoint(c.keys[i], 8, c.state[i]), i)
        c.handle(3, lagging.receive(encode(cp), 1.0))
    assert lagging.stable_seq == 8
    [fetch] = c.fetches[3]
    assert (fetch.seq, fetch.state_digest) == (8, c.state[0])
    c.replicas[0].vs.check_checkpoint_cert(fetch.seq, fetch.state_digest, fetch.certificate)
    stale = lagging.state_transferred(4, b"\0" * 32, 1.0)  # an older target: ignored
    assert not stale.messages and not stale.committed and lagging.last_executed == 0
    c.state[3] = c.state[0]
    c.handle(3, lagging.state_transferred(8, c.state[0], 1.0))
    assert lagging.last_executed == lagging.last_delivered == 8
    c.propose(0, b"after")
    c.deliver_all()
    assert c.delivered[3] == [(9, (b"after",))]


def test_status_brings_a_lagging_replica_up_to_date() -> None:
    c = Cluster()
    c.down.add(3)
    for k in range(3):
        c.propose(0, b"tx-%d" % k)
    c.deliver_all()
    c.down.clear()
    c.submit_all(b"pending")  # replica 3 now waits for something: its next tick sends STATUS
    c.tick_all(P.status_interval)
    c.deliver_all()
    assert [s for s, _ in c.delivered[3]] == [1, 2, 3]


# ------------------------------------------------------------ view change


def test_timeout_doubles_per_failed_view_change_and_is_capped() -> None:
    assert [P.timeout(k) for k in range(7)] == [1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    c = Cluster()
    r = c.replicas[1]
    r.submit(b"stuck", 0.0)
    assert r.next_wakeup() == pytest.approx(P.status_interval)
    deadline = r._deadline
    assert deadline == 1.0
    waits = []
    now = 0.0
    for _ in range(5):
        # The other replicas send their VIEW-CHANGE too, so the new-view timer starts.
        now = r._deadline if r._deadline is not None else now
        r.tick(now)
        for i in (2, 3):
            vc = sign_as(ViewChange(c.keys[i], r.view, 0, GENESIS_STATE_DIGEST, (), ()), i)
            r.receive(encode(vc), now)
        assert r._deadline is not None
        waits.append(r._deadline - now)
    assert [c.replicas[1].view] == [5]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_progress_resets_the_timeout() -> None:
    c = Cluster()
    c.submit_all(b"r1")
    c.filter = lambda src, dst, m: src != 0  # the primary is silent
    c.tick_all(1.0)
    c.deliver_all()
    assert all(r.view == 1 and r.active for r in c.replicas[1:])
    assert c.replicas[2]._failed_vcs == 1 and c.replicas[2]._deadline == 2.0
    c.propose(1, *c.replicas[1].pending_requests())
    c.deliver_all()
    assert [b for _, b in c.delivered[2]] == [(b"r1",)]
    assert c.replicas[2]._failed_vcs == 0 and c.replicas[2]._deadline is None


def test_slow_rounds_stretch_the_request_timer_up_to_the_cap() -> None:
    """A loaded network whose rounds take longer than the base timeout is not taken for a
    faulty primary: the request timer is at least ROUND_TIMEOUT_FACTOR recent rounds."""
    c = Cluster()
    r = c.replicas[2]
    now = 0.0
    for k in range(6):  # every round takes 1.5 s (the base timeout is 1 s)
        c.propose(0, b"slow-%d" % k)
        c.deliver_all(limit=3)  # the PRE-PREPAREs arrive at once; the rest 1.5 s later
        now += 1.5
        c.now = now
        c.deliver_all()
    assert r.last_delivered == 6 and r.view == 0
    assert r._round_time == pytest.approx(1.5)
    c.submit_all(b"waiting")
    assert r._deadline == pytest.approx(now + ROUND_TIMEOUT_FACTOR * 1.5)
    assert r._request_timeout() == pytest.approx(6.0)
    r._round_time = 1000.0  # a primary cannot stretch it past the maximum timeout
    assert r._request_timeout() == P.max_view_change_timeout


def test_backups_retransmit_few_requests_and_only_when_the_primary_stalls() -> None:
    c = Cluster()
    r = c.replicas[1]
    for k in range(200):
        r.submit(b"req-%d" % k, 0.0, forward=False)
    assert not r.submit(b"req-x", 0.0, forward=False).messages  # the host forwarded it already
    # Nothing delivered for half the timeout: the oldest few, at most RETRANSMIT_REQUESTS a tick.
    step = r.tick(0.6)
    requests = [m for m in step.messages if decode(m.data).kind == Kind.REQUEST]
    assert len(requests) == RETRANSMIT_REQUESTS
    assert [decode(m.data).request for m in requests][:2] == [b"req-0", b"req-1"]
    # To every replica (to=None), as a client broadcasts: the host may have sent a request to
    # the primary alone, and the other backups must time it too.
    assert all(m.to is None for m in requests)
    step = r.tick(0.6 + P.status_interval)
    again = [decode(m.data).request for m in step.messages if decode(m.data).kind == Kind.REQUEST]
    assert again[0] == b"req-%d" % RETRANSMIT_REQUESTS  # each at most once per timeout
    # While batches commit, a long queue is not a lost request: nothing is retransmitted.
    c2 = Cluster()
    b = c2.replicas[1]
    for k in range(50):
        b.submit(b"q-%d" % k, 0.0, forward=False)
    c2.now = 0.55
    c2.submit_all(b"moving")
    c2.propose(0, b"moving")
    c2.deliver_all()
    assert b.last_delivered == 1
    step = b.tick(0.8)
    assert not [m for m in step.messages if decode(m.data).kind == Kind.REQUEST]


def test_a_view_change_no_quorum_joins_follows_a_higher_view_after_a_timeout() -> None:
    """Replicas split across views (a VIEW-CHANGE lost, a restart) meet again: one stuck
    without a quorum follows the smallest higher view another validator wants."""
    c = Cluster()
    r = c.replicas[1]
    r.submit(b"stuck", 0.0)
    r.tick(r._deadline)  # request timer: VIEW-CHANGE for view 1, nobody joins
    assert (r.view, r.active) == (1, False)
    vc2 = sign_as(ViewChange(c.keys[0], 2, 0, GENESIS_STATE_DIGEST, (), ()), 0)
    r.receive(encode(vc2), 1.5)
    assert r.view == 1  # one is not f + 1
    assert r._deadline is not None
    step = r.tick(r._deadline)
    assert (r.view, r.active) == (2, False)
    assert [decode(m.data).kind for m in step.messages if decode(m.data).kind == Kind.VIEW_CHANGE]
    # and a replica further on resends the VIEW-CHANGE a laggard may lack for its view
    vc1_from_r = r._own_vcs[1]
    lagging = sign_as(ViewChange(c.keys[3], 1, 0, GENESIS_STATE_DIGEST, (), ()), 3)
    step = r.receive(encode(lagging), 2.0)
    assert [m.data for m in step.messages if m.to == c.keys[3]] == [encode(vc1_from_r)]


def test_a_round_under_way_extends_the_request_timer() -> None:
    c = Cluster()
    r = c.replicas[2]
    c.submit_all(b"r1")
    c.queue.clear()  # the backups' REQUESTs to the primary
    first = r._deadline
    assert first == P.view_change_timeout
    c.now = 0.9
    c.propose(0, b"r1")
    c.deliver_all(limit=3)  # only the PRE-PREPAREs
    assert r._deadline is not None and r._deadline > first  # the next seq was pre-prepared


def test_f_plus_one_view_changes_pull_a_replica_to_the_smallest_higher_view() -> None:
    c = Cluster()
    r = c.replicas[0]
    vc3 = sign_as(ViewChange(c.keys[1], 3, 0, GENESIS_STATE_DIGEST, (), ()), 1)
    vc2 = sign_as(ViewChange(c.keys[2], 2, 0, GENESIS_STATE_DIGEST, (), ()), 2)
    r.receive(encode(vc3), 0.0)
    assert r.view == 0 and r.active  # one is not enough (f + 1 = 2)
    step = r.receive(encode(vc2), 0.0)
    assert (r.view, r.active) == (2, False)
    assert [decode(m.data).kind for m in step.messages] == [Kind.VIEW_CHANGE]


def _prepared_cert(c: Cluster, view: int, seq: int, d: bytes) -> PreparedCert:
    primary = view % c.n
    pp = sign_as(PrePrepare(c.keys[primary], view, seq, d), primary)
    backups = [i for i in range(c.n) if i != primary][: c.vs.quorum - 1]
    sigs = tuple(sorted((c.keys[i], sign_as(Prepare(c.keys[i], view, seq, d), i).signature) for i in backups))
    return PreparedCert(view, seq, d, pp.signature, sigs)


def _view_changes(c: Cluster, view: int) -> list[ViewChange]:
    d1, d2, d3 = digest((b"one",)), digest((b"two",)), digest((b"three",))
    p = [
        (_prepared_cert(c, 0, 1, d1), _prepared_cert(c, 0, 3, d3)),
        (_prepared_cert(c, 0, 1, d1), _prepared_cert(c, 1, 3, d2)),
        (),
    ]
    return [sign_as(ViewChange(c.keys[i], view, 0, GENESIS_STATE_DIGEST, (), p[i]), i) for i in range(3)]


def test_new_view_o_set_takes_the_highest_view_and_fills_gaps_with_null() -> None:
    c = Cluster()
    vcs = _view_changes(c, 2)
    plan = plan_new_view(TEST_CHAIN_ID, vcs)
    assert (plan.min_s, plan.max_s) == (0, 3)
    assert plan.entries == ((1, digest((b"one",))), (2, digest(())), (3, digest((b"two",))))


def _new_view(c: Cluster, view: int, vcs: list[ViewChange], entries: list[tuple[int, bytes]]) -> NewView:
    primary = view % c.n
    o = tuple(OEntry(s, d, sign_as(PrePrepare(c.keys[primary], view, s, d), primary).signature) for s, d in entries)
    return sign_as(NewView(c.keys[primary], view, tuple(vcs), o), primary)


def test_a_bad_new_view_is_rejected() -> None:
    c = Cluster()
    vcs = _view_changes(c, 2)
    good = list(plan_new_view(TEST_CHAIN_ID, vcs).entries)
    check_new_view(c.vs, _new_view(c, 2, vcs, good), P.log_window)
    bad_o = [
        good[:-1],  # drops a batch that may have committed
        [*good[:2], (3, digest((b"three",)))],  # takes the lower-view certificate
        [*good, (4, digest(()))],  # invents a sequence number
        [(1, digest((b"evil",))), *good[1:]],  # invents a batch
    ]
    for entries in bad_o:
        with pytest.raises(InvalidNewView):
            check_new_view(c.vs, _new_view(c, 2, vcs, entries), P.log_window)
    with pytest.raises(InvalidNewView):  # too few VIEW-CHANGE messages
        check_new_view(c.vs, _new_view(c, 2, vcs[:2], good), P.log_window)
    with pytest.raises(InvalidNewView):  # one of them is for another view
        other = sign_as(ViewChange(c.keys[3], 3, 0, GENESIS_STATE_DIGEST, (), ()), 3)
        check_new_view(c.vs, _new_view(c, 2, [*vcs[:2], other], good), P.log_window)
    forged = dataclasses.replace(vcs[0], prepared=(dataclasses.replace(vcs[0].prepared[0], digest=b"\7" * 32),))
    with pytest.raises(InvalidNewView):  # a prepared certificate that does not verify
        check_new_view(c.vs, _new_view(c, 2, [forged, *vcs[1:]], good), P.log_window)
    not_primary = sign_as(NewView(c.keys[1], 2, tuple(vcs), ()), 1)
    with pytest.raises(Exception, match="primary"):
        c.replicas[3].receive(encode(not_primary), 0.0)
    # And a replica rejects it as a message too, and stays where it was.
    r = c.replicas[3]
    with pytest.raises(InvalidNewView):
        r.receive(encode(_new_view(c, 2, vcs, good[:-1])), 0.0)
    assert (r.view, r.active) == (0, True)


def test_a_new_view_reproposes_prepared_batches() -> None:
    c = Cluster()
    c.filter = lambda src, dst, m: not isinstance(m, Commit)  # prepared everywhere, committed nowhere
    c.propose(0, b"keep-me")
    c.deliver_all()
    assert all(r._slots[1].prepared for r in c.replicas)
    assert not any(c.delivered)
    c.filter = lambda src, dst, m: src != 0  # now the primary falls silent
    c.tick_all(1.0)
    c.deliver_all()
    for i in (1, 2, 3):
        assert c.replicas[i].view == 1 and c.replicas[i].active
        assert c.delivered[i][0] == (1, (b"keep-me",))


# ------------------------------------------------------------ restart


def test_a_restored_replica_never_votes_two_ways() -> None:
    c = Cluster()
    a, b = (b"a",), (b"b",)
    r = c.replicas[1]
    c.handle(1, r.receive(encode(sign_as(PrePrepare(c.keys[0], 0, 1, digest(a), a), 0)), 0.0))
    assert VoteRecord(Kind.PREPARE, 0, 1, digest(a)) in c.records[1]
    [before] = {data for src, _, data in c.queue if src == 1}
    c.queue.clear()
    c.restart(1)
    r2 = c.replicas[1]
    step = r2.receive(encode(sign_as(PrePrepare(c.keys[0], 0, 1, digest(b), b), 0)), 0.0)
    assert not step.messages and not step.records  # the conflicting pre-prepare gets no vote
    step = r2.receive(encode(sign_as(PrePrepare(c.keys[0], 0, 1, digest(a), a), 0)), 0.0)
    assert [m.data for m in step.messages] == [before]  # the very same signed PREPARE again
    assert [e.sender for e in step.evidence] == [c.keys[0]]  # and the primary equivocated
    # Its STATUS answer retransmits that vote too.
    status = sign_as(Status(c.keys[2], 0, True, 0, 0), 2)
    assert [m.data for m in r2.receive(encode(status), 0.0).messages] == [before]


def test_a_restored_replica_redelivers_what_committed_but_did_not_execute() -> None:
    c = Cluster()
    c.auto_execute = False
    c.propose(0, b"x")
    c.deliver_all()
    assert c.replicas[2].last_delivered == 1 and c.replicas[2].last_executed == 0
    c.restart(2)
    assert c.delivered[2] == [(1, (b"x",)), (1, (b"x",))]
    assert c.replicas[2].view == 0 and c.replicas[2].last_delivered == 1


def test_a_restored_view_change_keeps_its_view() -> None:
    c = Cluster()
    r = c.replicas[2]
    c.submit_all(b"r")
    c.filter = lambda src, dst, m: False
    c.tick_all(1.0)
    assert (r.view, r.active) == (1, False)
    c.restart(2)
    assert (c.replicas[2].view, c.replicas[2].active) == (1, False)
    assert c.replicas[2].next_wakeup() <= 1.0 + P.timeout(1)


def test_records_round_trip() -> None:
    from prsm_node.consensus import decode_record, encode_record

    c = Cluster()
    for k in range(6):
        c.propose(0, b"tx-%d" % k)
    c.deliver_all()
    records = c.records[1]
    assert {type(x).__name__ for x in records} >= {"VoteRecord", "BatchRecord", "PreparedRecord", "CommitRecord"}
    assert [decode_record(encode_record(x)) for x in records] == records


def test_validators_need_four_distinct_keys() -> None:
    from prsm_node.consensus import ConfigurationError, ValidatorSet

    with pytest.raises(ConfigurationError):
        ValidatorSet(TEST_CHAIN_ID, make_validators(4).validators[:3])
    with pytest.raises(ConfigurationError):
        ValidatorSet(TEST_CHAIN_ID, (b"\1" * 32,) * 4)
    vs = make_validators(7)
    assert (vs.f, vs.quorum, vs.weak) == (2, 5, 3)
