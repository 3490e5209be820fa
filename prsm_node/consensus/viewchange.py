"""View change: checking VIEW-CHANGE messages and computing / checking a NEW-VIEW's O set.

Castro & Liskov (OSDI'99, section 4.4): the new primary collects a quorum V of valid
VIEW-CHANGE messages for view v+1 (its own among them) and computes

- ``min_s``: the highest stable checkpoint seq in V;
- ``max_s``: the highest seq of a prepared certificate in V (``min_s`` if there is none);
- O: for every seq n in ``(min_s, max_s]``, a PRE-PREPARE in v+1 for the digest of the
  prepared certificate with the highest view for n in V, or for the null batch ``()`` when
  no message in V prepared n.

Every replica recomputes O from V and rejects a NEW-VIEW whose O differs, so a faulty new
primary can neither drop a batch that may have committed nor invent one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .certs import ValidatorSet
from .exceptions import InvalidMessage, InvalidNewView, InvalidViewChange, NotPrimary
from .messages import NewView, PreparedCert, PrePrepare, ViewChange, batch_digest


@dataclass(frozen=True)
class NewViewPlan:
    """What a quorum of VIEW-CHANGE messages implies for the new view."""

    min_s: int
    max_s: int
    checkpoint: ViewChange  # a message of V carrying the checkpoint at min_s (and its cert)
    entries: tuple[tuple[int, bytes], ...]  # (seq, digest) for seq in (min_s, max_s]


def check_view_change(vs: ValidatorSet, vc: ViewChange, log_window: int) -> None:
    """Signature, checkpoint certificate and prepared certificates of one VIEW-CHANGE."""
    vs.check(vc)
    if vc.view == 0:
        raise InvalidViewChange("no VIEW-CHANGE can lead to view 0")
    vs.check_checkpoint_cert(vc.stable_seq, vc.state_digest, vc.checkpoint_cert)
    last = vc.stable_seq
    for c in vc.prepared:
        if c.seq <= last:
            raise InvalidViewChange("prepared certificates must be in strictly ascending seq above the checkpoint")
        if c.seq > vc.stable_seq + log_window:
            raise InvalidViewChange(f"prepared seq {c.seq} is beyond the window of checkpoint {vc.stable_seq}")
        if c.view >= vc.view:
            raise InvalidViewChange(f"prepared in view {c.view}, not below the new view {vc.view}")
        vs.check_prepared_cert(c)
        last = c.seq


def plan_new_view(chain_id: str, view_changes: Sequence[ViewChange]) -> NewViewPlan:
    """Compute min_s, max_s and O from (already checked) VIEW-CHANGE messages."""
    checkpoint = max(view_changes, key=lambda vc: (vc.stable_seq, vc.sender))
    min_s = checkpoint.stable_seq
    best: dict[int, PreparedCert] = {}
    for vc in view_changes:
        for c in vc.prepared:
            if c.seq <= min_s:
                continue
            old = best.get(c.seq)
            # Two certificates for one (view, seq) with different digests cannot both be
            # valid with at most f faults; the digest tie-break only keeps this deterministic.
            if old is None or (c.view, c.digest) > (old.view, old.digest):
                best[c.seq] = c
    max_s = max(best, default=min_s)
    null = batch_digest(chain_id, ())
    entries = tuple((n, best[n].digest if n in best else null) for n in range(min_s + 1, max_s + 1))
    return NewViewPlan(min_s, max_s, checkpoint, entries)


def check_new_view(vs: ValidatorSet, nv: NewView, log_window: int) -> NewViewPlan:
    """Everything a replica checks before it accepts a NEW-VIEW; returns the plan."""
    if nv.sender != vs.primary(nv.view):
        raise NotPrimary(f"NEW-VIEW for view {nv.view} not from its primary")
    vs.check(nv)
    senders = {vc.sender for vc in nv.view_changes}
    if len(senders) != len(nv.view_changes):
        raise InvalidNewView("a validator appears twice in V")
    if len(senders) < vs.quorum:
        raise InvalidNewView(f"V holds {len(senders)} VIEW-CHANGE messages, needs {vs.quorum}")
    for vc in nv.view_changes:
        if vc.view != nv.view:
            raise InvalidNewView(f"V holds a VIEW-CHANGE for view {vc.view}, not {nv.view}")
        try:
            check_view_change(vs, vc, log_window)
        except InvalidMessage as exc:
            raise InvalidNewView(f"V holds a bad VIEW-CHANGE: {exc}") from None
    plan = plan_new_view(vs.chain_id, nv.view_changes)
    got = tuple((o.seq, o.digest) for o in nv.pre_prepares)
    if got != plan.entries:
        raise InvalidNewView("the O set differs from the one derived from V")
    for o in nv.pre_prepares:
        vs.check(PrePrepare(nv.sender, nv.view, o.seq, o.digest, (), o.signature))
    return plan
