"""A seeded, deterministic discrete-event simulation of PBFT replicas.

One ``random.Random(seed)`` and a virtual clock drive n = 4 or 7 real ``Replica`` objects
(real Ed25519 keys, real codecs) over a simulated network that drops, delays, duplicates and
reorders messages, crashes replicas and restarts them from their persisted records only,
and runs up to f Byzantine validators: *silent* (sends nothing), *badsig* (corrupts about
half of its signatures) or *equivocate* (as primary, sends different PRE-PREPAREs for one
view/seq to different backups, and sometimes conflicting PREPARE/COMMITs).

Checked on every run:

- safety: no two honest replicas deliver different batches at one seq; each honest host
  sees seqs delivered in order, exactly once (state transfers aside), each with a valid
  commit certificate; a certified checkpoint always equals the honest state;
- no evidence and no rejected message ever names an honest validator (a restarted replica
  never votes two ways);
- liveness: after ``fault_until`` the network is timely, every crashed honest replica is
  restarted, and fresh requests must reach every honest replica within ``liveness_bound``.

Two runs with one seed give the same ``trace_hash``. Signatures are made and checked for
real but cached by payload (sign) and by (key, payload, signature) (verify), and decoded
messages are cached by their bytes: the network delivers one message to many replicas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nacl.signing

from .certs import GENESIS_STATE_DIGEST, ValidatorSet
from .exceptions import InvalidMessage
from .messages import (
    Batch,
    Commit,
    KeySigner,
    Message,
    Prepare,
    PrePrepare,
    batch_digest,
    decode,
    encode,
    request_digest,
    signing_payload,
    verify_signature,
)
from .outputs import Evidence, FetchState, Step
from .params import PbftParams
from .records import Record, decode_record, encode_record, prune_records
from .replica import Replica

CHAIN_ID = "prsm-sim"
_M = TypeVar("_M", bound=Message)
BYZANTINE_MODES = ("silent", "badsig", "equivocate")


class CachingSigner:
    """Signs with a real key; the same payload is signed once (Ed25519 is deterministic)."""

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._inner = KeySigner(key)
        self._cache: dict[bytes, bytes] = {}

    @property
    def public_key(self) -> bytes:
        return self._inner.public_key

    def sign(self, payload: bytes) -> bytes:
        sig = self._cache.get(payload)
        if sig is None:
            sig = self._cache[payload] = self._inner.sign(payload)
        return sig


class VerifyCache:
    """``verify`` that checks each distinct (key, payload, signature) once."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes, bytes], bool] = {}
        self.misses = 0

    def __call__(self, key: bytes, payload: bytes, sig: bytes) -> bool:
        k = (key, payload, sig)
        ok = self._cache.get(k)
        if ok is None:
            self.misses += 1
            ok = self._cache[k] = verify_signature(key, payload, sig)
        return ok


_KEYS = [nacl.signing.SigningKey(hashlib.sha256(b"prsm-sim-key-%d" % i).digest()) for i in range(7)]


@dataclass(frozen=True)
class Scenario:
    seed: int
    n: int
    byzantine: tuple[tuple[int, str], ...]  # (validator index, mode)
    fault_until: float
    drop: float
    duplicate: float
    max_delay: float
    crashes: int
    requests: int
    liveness_requests: int = 3
    liveness_bound: float = 90.0

    @classmethod
    def from_seed(cls, seed: int, n: int | None = None) -> Scenario:
        rng = random.Random(f"scenario-{seed}")
        n = n if n is not None else (4 if seed % 2 == 0 else 7)
        f = (n - 1) // 3
        count = rng.choice([0, 1, 1, f])
        indices = rng.sample(range(n), count)
        if count and rng.random() < 0.5:
            indices[0] = 0  # often the primary of view 0
            indices = list(dict.fromkeys(indices))
        byz = tuple(sorted((i, rng.choice(BYZANTINE_MODES)) for i in indices))
        return cls(
            seed=seed,
            n=n,
            byzantine=byz,
            fault_until=rng.uniform(4.0, 12.0),
            drop=rng.choice([0.0, 0.05, 0.15, 0.3]),
            duplicate=rng.choice([0.0, 0.05, 0.2]),
            max_delay=rng.choice([0.01, 0.1, 0.5, 1.5]),
            crashes=rng.choice([0, 0, 1, 2, 3]),
            requests=rng.randint(5, 25),
        )


@dataclass
class SimResult:
    scenario: Scenario
    ok: bool
    violations: list[str]
    trace_hash: str
    end_time: float
    delivered: int
    views: tuple[int, ...]
    evidence: int
    rejected: int
    messages: int
    state_transfers: int


@dataclass
class _Node:
    index: int
    signer: CachingSigner
    mode: str | None  # None: honest
    replica: Replica | None = None
    records: list[bytes] = field(default_factory=list)
    executed: int = 0
    state: bytes = GENESIS_STATE_DIGEST
    done: set[bytes] = field(default_factory=set)
    epoch: int = 0
    tick_at: float | None = None
    propose_scheduled: bool = False
    transfers: int = 0
    fetching: tuple[int, bytes] | None = None


class Simulation:
    def __init__(self, scenario: Scenario, params: PbftParams | None = None) -> None:
        self.sc = scenario
        self.params = params or PbftParams.for_tests()
        self.rng = random.Random(scenario.seed)
        self.verify = VerifyCache()
        self.keys = _KEYS[: scenario.n]
        self.vs = ValidatorSet(CHAIN_ID, tuple(bytes(k.verify_key) for k in self.keys), self.verify)
        modes = dict(scenario.byzantine)
        self.nodes = [_Node(i, CachingSigner(k), modes.get(i)) for i, k in enumerate(self.keys)]
        self.index = {n.signer.public_key: n.index for n in self.nodes}
        self.now = 0.0
        self._queue: list[tuple[float, int, tuple[Any, ...]]] = []
        self._counter = 0
        self._trace = hashlib.sha256()
        self._decoded: dict[bytes, Message] = {}
        self.truth: dict[int, bytes] = {}
        self.truth_state: dict[int, bytes] = {0: GENESIS_STATE_DIGEST}
        self.batches: dict[bytes, Batch] = {}
        self.violations: list[str] = []
        self.evidence = 0
        self.rejected = 0
        self.messages = 0
        self.live: list[bytes] = []
        self._progressed = False  # something executed since the last liveness check

    # -------------------------------------------------------- scheduling

    def _at(self, t: float, *event: Any) -> None:
        self._counter += 1
        heapq.heappush(self._queue, (t, self._counter, event))

    def _faulty(self) -> bool:
        return self.now < self.sc.fault_until

    def honest(self) -> Iterator[_Node]:
        return (n for n in self.nodes if n.mode is None)

    # -------------------------------------------------------- run

    def run(self) -> SimResult:
        sc = self.sc
        for node in self.nodes:
            self._start(node, restore=False)
        for k in range(sc.requests):
            self._at(self.rng.uniform(0.0, sc.fault_until), "client", b"req-%d-%d" % (sc.seed, k), False)
        honest = [n.index for n in self.honest()]
        for _ in range(sc.crashes):
            t = self.rng.uniform(0.0, sc.fault_until)
            self._at(t, "crash", self.rng.choice(honest))
        self._at(sc.fault_until, "heal")
        for k in range(sc.liveness_requests):
            request = b"live-%d-%d" % (sc.seed, k)
            self.live.append(request)
            self._at(sc.fault_until + 0.5 + k * 0.3, "client", request, True)
        deadline = sc.fault_until + sc.liveness_bound
        while self._queue and not self.violations:
            t, _, event = heapq.heappop(self._queue)
            if t > deadline:
                break
            self.now = t
            self._trace.update(repr((t, event[0], event[1] if len(event) > 1 else None)).encode())
            self._handle(event)
            if self._progressed and self.now >= sc.fault_until:
                self._progressed = False
                if self._live_done():
                    break
        if not self._live_done() and not self.violations:
            missing = [
                n.index for n in self.honest() if not all(request_digest(r) in n.done for r in self.live)
            ]
            self.violations.append(f"liveness: honest replicas {missing} did not commit new requests by t={deadline}")
        delivered = max((n.executed for n in self.honest()), default=0)
        views = tuple(n.replica.view if n.replica else -1 for n in self.nodes)
        return SimResult(
            scenario=sc,
            ok=not self.violations,
            violations=self.violations,
            trace_hash=self._trace.hexdigest(),
            end_time=self.now,
            delivered=delivered,
            views=views,
            evidence=self.evidence,
            rejected=self.rejected,
            messages=self.messages,
            state_transfers=sum(n.transfers for n in self.nodes),
        )

    def _live_done(self) -> bool:
        if self.now < self.sc.fault_until:
            return False
        wanted = [request_digest(r) for r in self.live]
        return all(n.replica is not None and all(d in n.done for d in wanted) for n in self.honest())

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "msg":
            _, dst, src, data = event
            self._deliver(self.nodes[dst], src, data)
        elif kind == "tick":
            _, i, t = event
            node = self.nodes[i]
            if node.replica is not None and node.tick_at == t:
                node.tick_at = None
                self._apply(node, node.replica.tick(self.now))
        elif kind == "client":
            _, request, reliable = event
            self._client(request, reliable)
        elif kind == "submit":
            _, i, request = event
            node = self.nodes[i]
            if node.replica is not None and request_digest(request) not in node.done:
                self._apply(node, node.replica.submit(request, self.now))
        elif kind == "propose":
            _, i, epoch = event
            node = self.nodes[i]
            node.propose_scheduled = False
            if node.replica is not None and node.epoch == epoch:
                self._propose(node)
        elif kind == "crash":
            node = self.nodes[event[1]]
            if node.replica is not None and self._faulty():
                node.replica = None
                node.fetching = None
                node.epoch += 1
                node.tick_at = None
                up = min(self.now + self.rng.uniform(0.2, 4.0), self.sc.fault_until)
                self._at(up, "restart", node.index)
        elif kind == "restart":
            node = self.nodes[event[1]]
            if node.replica is None:
                self._start(node, restore=True)
        elif kind == "heal":
            for node in self.nodes:
                if node.replica is None:
                    self._start(node, restore=True)
        elif kind == "transfer":
            _, i, epoch, seq, digest = event
            self._transfer(self.nodes[i], epoch, seq, digest)

    # -------------------------------------------------------- hosts

    def _validate(self, seq: int, batch: Batch) -> bool:
        return all(r.startswith((b"req-", b"live-")) for r in batch)

    def _start(self, node: _Node, *, restore: bool) -> None:
        signer = node.signer
        if not restore:
            node.replica = Replica(self.vs, signer, self.params, validate_batch=self._validate, now=self.now)
            self._apply(node, Step())
            return
        records = [decode_record(b) for b in node.records]
        node.records = [encode_record(r) for r in prune_records(records)]
        node.replica, step = Replica.restore(
            self.vs,
            signer,
            self.params,
            records,
            executed_seq=node.executed,
            validate_batch=self._validate,
            now=self.now,
        )
        self._apply(node, step)

    def _apply(self, node: _Node, step: Step) -> None:
        """Handle one Step the way a real host must: persist, send, execute, then the rest."""
        pending = [step]
        while pending:
            step = pending.pop(0)
            node.records.extend(encode_record(r) for r in step.records)
            for out in step.messages:
                me = node.signer.public_key
                targets = [out.to] if out.to is not None else [k for k in self.vs.validators if k != me]
                for key in targets:
                    self._send(node, self.index[key], out.data)
            for evidence in step.evidence:
                self._check_evidence(node, evidence.sender, evidence.first, evidence.second)
            if step.fetch_state is not None:
                self._fetch(node, step.fetch_state)
            replica = node.replica
            assert replica is not None
            for c in step.committed:
                if c.seq != node.executed + 1:
                    self.violations.append(f"node {node.index}: delivered seq {c.seq} after {node.executed}")
                    return
                self._execute(node, c.seq, c.batch, c.certificate)
                pending.append(replica.executed(c.seq, node.state, self.now))
            for request in step.requests:
                if request_digest(request) not in node.done:
                    pending.append(replica.submit(request, self.now))
        if len(node.records) > 4000:
            node.records = [encode_record(r) for r in prune_records(decode_record(b) for b in node.records)]
        replica = node.replica
        assert replica is not None
        wake = replica.next_wakeup()
        if node.tick_at is None or wake < node.tick_at:
            node.tick_at = wake
            self._at(wake, "tick", node.index, wake)
        if replica.can_propose() and not node.propose_scheduled and replica.pending_requests(1):
            node.propose_scheduled = True
            self._at(self.now + 0.02, "propose", node.index, node.epoch)

    def _propose(self, node: _Node) -> None:
        replica = node.replica
        assert replica is not None
        batch = replica.pending_requests(4)
        if batch and replica.can_propose():
            self._apply(node, replica.propose(batch, self.now))

    def _execute(self, node: _Node, seq: int, batch: Batch, cert: Any) -> None:
        digest = batch_digest(CHAIN_ID, batch)
        if node.mode is None:
            if cert.seq != seq or cert.digest != digest:
                self.violations.append(f"node {node.index}: certificate for seq {cert.seq} does not match")
            try:
                self.vs.check_commit_cert(cert)
            except InvalidMessage as exc:
                self.violations.append(f"node {node.index}: bad commit certificate at {seq}: {exc}")
            known = self.truth.setdefault(seq, digest)
            if known != digest:
                self.violations.append(f"SAFETY: seq {seq} committed as {known.hex()[:12]} and {digest.hex()[:12]}")
        self._progressed = True
        node.executed = seq
        node.state = hashlib.sha256(node.state + digest).digest()
        if node.mode is None:
            expected = self.truth_state.setdefault(seq, node.state)
            if expected != node.state:
                self.violations.append(f"SAFETY: node {node.index} state at {seq} diverged")
        self.batches[digest] = batch
        node.done.update(request_digest(r) for r in batch)
        self._trace.update(b"exec %d %d " % (node.index, seq) + digest)

    def _fetch(self, node: _Node, fetch: FetchState) -> None:
        """Start a state transfer; a later FetchState replaces the one in progress."""
        node.fetching = (fetch.seq, fetch.state_digest)
        done = self.now + self.rng.uniform(0.05, 0.5)
        self._at(done, "transfer", node.index, node.epoch, fetch.seq, fetch.state_digest)

    def _transfer(self, node: _Node, epoch: int, seq: int, digest: bytes) -> None:
        replica = node.replica
        if replica is None or node.epoch != epoch or node.fetching != (seq, digest):
            return
        node.fetching = None
        expected = self.truth_state.get(seq)
        if expected != digest:
            if node.mode is None:
                self.violations.append(f"SAFETY: certified checkpoint {seq} is not the honest state")
            return
        if seq > node.executed:
            for s in range(node.executed + 1, seq + 1):
                node.done.update(request_digest(r) for r in self.batches[self.truth[s]])
        node.executed, node.state = seq, digest
        node.transfers += 1
        self._progressed = True
        replica.forget(node.done)
        self._apply(node, replica.state_transferred(seq, digest, self.now))

    def _client(self, request: bytes, reliable: bool) -> None:
        """A client request reaches the validators' mempools (lossy while faults last)."""
        up = [n for n in self.nodes if n.replica is not None]
        if not up:
            return
        sure = self.rng.choice(up).index
        for node in up:
            if reliable or node.index == sure or self.rng.random() >= self.sc.drop:
                self._at(self.now + self._delay(), "submit", node.index, request)

    # -------------------------------------------------------- network

    def _delay(self) -> float:
        if self._faulty():
            return self.rng.uniform(0.001, self.sc.max_delay)
        return self.rng.uniform(0.001, 0.01)

    def _send(self, node: _Node, dst: int, data: bytes) -> None:
        for payload in self._byzantine(node, dst, data):
            if self._faulty() and self.rng.random() < self.sc.drop:
                continue
            copies = 2 if self._faulty() and self.rng.random() < self.sc.duplicate else 1
            for _ in range(copies):
                self.messages += 1
                self._at(self.now + self._delay(), "msg", dst, node.index, payload)

    def _byzantine(self, node: _Node, dst: int, data: bytes) -> list[bytes]:
        if node.mode is None:
            return [data]
        if node.mode == "silent":
            return []
        m = self._decode(data)
        if node.mode == "badsig":
            if self.rng.random() < 0.5:
                return [data]
            bad = bytearray(m.signature)
            bad[self.rng.randrange(len(bad))] ^= 1 << self.rng.randrange(8)
            return [encode(_with_signature(m, bytes(bad)))]
        # equivocate
        if m.sender != node.signer.public_key:
            return [data]
        if isinstance(m, PrePrepare):
            twin_batch = (*m.batch, b"req-evil-%d-%d" % (m.view, m.seq))
            twin = PrePrepare(m.sender, m.view, m.seq, batch_digest(CHAIN_ID, twin_batch), twin_batch)
            twin_data = encode(self._signed(node, twin))
            choice = (dst + m.seq) % 2
            out = [twin_data] if choice else [data]
            if self.rng.random() < 0.2:
                out.append(data if choice else twin_data)
            return out
        if isinstance(m, Prepare | Commit) and self.rng.random() < 0.2:
            other = hashlib.sha256(b"evil" + m.digest).digest()
            return [data, encode(self._signed(node, _with_digest(m, other)))]
        return [data]

    def _signed(self, node: _Node, m: Message) -> Message:
        return _with_signature(m, node.signer.sign(signing_payload(m, CHAIN_ID)))

    def _decode(self, data: bytes) -> Message:
        m = self._decoded.get(data)
        if m is None:
            m = self._decoded[data] = decode(data)
        return m

    def _deliver(self, node: _Node, src: int, data: bytes) -> None:
        replica = node.replica
        if replica is None:
            return
        try:
            step = replica.receive_message(self._decode(data), self.now)
        except InvalidMessage as exc:
            self.rejected += 1
            if self.nodes[src].mode is None:
                self.violations.append(f"node {node.index} rejected a message of honest node {src}: {exc!r}")
            return
        self._apply(node, step)

    def _check_evidence(self, node: _Node, sender: bytes, first: bytes, second: bytes) -> None:
        if node.mode is not None:
            return
        self.evidence += 1
        culprit = self.index[sender]
        a, b = decode(first), decode(second)
        try:
            self.vs.check(a)
            self.vs.check(b)
        except InvalidMessage as exc:
            self.violations.append(f"node {node.index} produced evidence with a bad signature: {exc}")
        if a.sender != sender or b.sender != sender or a.kind != b.kind or encode(a) == encode(b):
            self.violations.append(f"node {node.index} produced malformed evidence")
        if self.nodes[culprit].mode is None:
            self.violations.append(f"node {node.index} reports evidence against honest node {culprit}: {a} / {b}")


def _with_signature(m: _M, signature: bytes) -> _M:
    return dataclasses.replace(m, signature=signature)


def _with_digest(m: Prepare | Commit, digest: bytes) -> Message:
    return dataclasses.replace(m, digest=digest, signature=b"")


def run_seed(seed: int, n: int | None = None) -> SimResult:
    """Run the scenario derived from ``seed`` (n = 4 for even seeds, 7 for odd ones)."""
    return Simulation(Scenario.from_seed(seed, n)).run()


# ------------------------------------------------------------ a synchronous cluster for unit tests

TEST_CHAIN_ID = "prsm-test-1"
TEST_KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(7)]

Filter = Callable[[int, int, Message], bool]
"""``filter(sender index, receiver index, message) -> deliver?``"""


def make_validators(n: int = 4) -> ValidatorSet:
    """Validators with the keys of seeds 0x01…01, 0x02…02, ... on chain ``prsm-test-1``."""
    return ValidatorSet(TEST_CHAIN_ID, tuple(bytes(k.verify_key) for k in TEST_KEYS[:n]))


def sign_as(m: _M, index: int, chain_id: str = TEST_CHAIN_ID) -> _M:
    """``m`` signed by test validator ``index`` (for hand-built, possibly hostile, messages)."""
    return _with_signature(m, TEST_KEYS[index].sign(signing_payload(m, chain_id)).signature)


class Cluster:
    """``n`` replicas over a FIFO queue with no time and no randomness: unit tests step it by
    hand (``propose``, ``deliver_all``, ``tick_all``) and may drop messages with ``filter``.
    Hosts execute each delivered batch at once (state digest = hash chain of batch digests)."""

    def __init__(self, n: int = 4, params: PbftParams | None = None) -> None:
        self.n = n
        self.params = params or PbftParams.for_tests()
        self.vs = make_validators(n)
        self.keys = list(self.vs.validators)
        self.now = 0.0
        self.filter: Filter | None = None
        self.replicas = [Replica(self.vs, KeySigner(TEST_KEYS[i]), self.params) for i in range(n)]
        self.records: list[list[Record]] = [[] for _ in range(n)]
        self.state = [GENESIS_STATE_DIGEST for _ in range(n)]
        self.delivered: list[list[tuple[int, Batch]]] = [[] for _ in range(n)]
        self.evidence: list[list[Evidence]] = [[] for _ in range(n)]
        self.fetches: list[list[FetchState]] = [[] for _ in range(n)]
        self.queue: list[tuple[int, int, bytes]] = []
        self.down: set[int] = set()
        self.auto_execute = True

    def handle(self, i: int, step: Step) -> None:
        self.records[i].extend(step.records)
        for out in step.messages:
            targets = [self.keys.index(out.to)] if out.to is not None else [j for j in range(self.n) if j != i]
            self.queue.extend((i, j, out.data) for j in targets)
        self.evidence[i].extend(step.evidence)
        if step.fetch_state is not None:
            self.fetches[i].append(step.fetch_state)
        for c in step.committed:
            self.delivered[i].append((c.seq, c.batch))
            if self.auto_execute:
                self.state[i] = hashlib.sha256(self.state[i] + c.certificate.digest).digest()
                self.handle(i, self.replicas[i].executed(c.seq, self.state[i], self.now))
        for request in step.requests:
            self.handle(i, self.replicas[i].submit(request, self.now))

    def deliver_all(self, limit: int = 100_000) -> int:
        """Deliver queued messages (and what they cause) until the queue is empty."""
        count = 0
        while self.queue and count < limit:
            src, dst, data = self.queue.pop(0)
            if dst in self.down or src in self.down:
                continue
            if self.filter is not None and not self.filter(src, dst, decode(data)):
                continue
            count += 1
            self.handle(dst, self.replicas[dst].receive(data, self.now))
        return count

    def propose(self, i: int, *requests: bytes) -> None:
        self.handle(i, self.replicas[i].propose(list(requests), self.now))

    def submit_all(self, request: bytes) -> None:
        for i in range(self.n):
            if i not in self.down:
                self.handle(i, self.replicas[i].submit(request, self.now))

    def tick_all(self, now: float) -> None:
        self.now = now
        for i in range(self.n):
            if i not in self.down:
                self.handle(i, self.replicas[i].tick(now))

    def restart(self, i: int) -> None:
        """Replace replica ``i`` by one restored from its records (host state kept)."""
        self.replicas[i], step = Replica.restore(
            self.vs,
            KeySigner(TEST_KEYS[i]),
            self.params,
            self.records[i],
            executed_seq=self.replicas[i].last_executed,
            now=self.now,
        )
        self.handle(i, step)
