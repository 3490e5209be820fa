"""One model fetch: resolve the manifest, ask providers HAVE, pull the missing chunks from
several providers at once, verify each and write it straight into the model's files.

Which provider gets which chunk is schedule.py's (work stealing, rarest first, penalties, slow
providers). Every provider runs ``streams_per_peer`` workers, each with its own reused stream,
pipelined (the next GET_CHUNKS goes out before the current answer is read). A provider is
penalised for a chunk that fails verification, a transfer that breaks, or an ``internal``
error; one that breaks the protocol, answers ``not_found``/``halted``, or cannot be reached is
dropped at once.

Every received chunk is hashed against the manifest, then written once, at its offset, into
the model's files (:class:`~prsm_node.shards.Assembly`); the store records it as verified once
its bytes are flushed. Resume is a property of that record: the chunks a fetch needs are those
``store.missing()`` reports when it starts, so a fetch restarted after a cancel or a daemon
restart never asks for a chunk already verified. ``chunks_present`` and ``chunks_fetched``
show the split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from ..logs import kv
from ..shards import Assembly, ErrorCode, Manifest, MissingChunks, QuotaExceeded, ShardError, ShardStore
from ..shards import Chunk as ChunkMsg
from ..wire import FrameError
from .background import LowPriorityThread
from .client import ShardStream
from .exceptions import FetchFailed, ModelHalted, NoProviders, ProtocolViolation, RemoteError, Unreachable
from .ipfs import IpfsBlocks
from .providers import Providers
from .schedule import FetchParams, Provider, Schedule

log = logging.getLogger(__name__)

# What a broken transfer raises: the stream or connection died, a frame was cut or too slow.
PEER_ERRORS = (BaseLibp2pError, FrameError, trio.TooSlowError, OSError, trio.BrokenResourceError,
               trio.ClosedResourceError)
MAX_REDISCOVERIES = 3
HALT_POLL = 1.0  # seconds between halt checks while a fetch waits

__all__ = ["Fetch", "FetchParams", "Provider"]


class Fetch:
    def __init__(self, manifest_id: bytes, *, host: IHost, kad: Any, store: ShardStore, providers: Providers,
                 params: FetchParams | None = None, is_halted: Callable[[bytes], bool] | None = None,
                 ipfs: IpfsBlocks | None = None) -> None:
        self.manifest_id = manifest_id
        self.host = host
        self.kad = kad
        self.store = store
        self.providers_source = providers
        self.dest = store.model_dir(manifest_id)
        self.params = params or FetchParams()
        self.is_halted = is_halted or (lambda mid: False)
        self.ipfs = ipfs
        self.chunks_from_ipfs = 0
        self._ipfs_tried: set[int] = set()
        self.state = "resolving"
        self.error: str | None = None
        self.error_code: str | None = None  # halted, quota_exceeded or fetch_failed
        self.done = trio.Event()
        self.manifest: Manifest | None = None
        self.files: list[str] = []
        self.chunks_total = self.chunks_present = self.chunks_fetched = self.bad_chunks = 0
        self.bytes_total = self.bytes_present = self.bytes_fetched = 0
        self.started = trio.current_time()
        self.finished: float | None = None
        # Seconds in each stage (resolve, transfer, assemble), and within them: ``lookup``, the
        # provider lookups (DHT and connected peers), ``first_chunk``, from the start until the
        # first CHUNK arrived.
        self.timings: dict[str, float] = {}
        self.sched = Schedule(self.params, 1, self._notify)
        self._cancel = trio.CancelScope()
        self._changed = trio.Event()
        self._spares: dict[ID, ShardStream] = {}
        self._candidates: list[ID] | None = None  # found while resolving the manifest: asked HAVE first
        self._hashes: tuple[bytes, ...] = ()
        self._sizes: list[int] = []
        self._fatal: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._assembly: Assembly | None = None
        self._flushing = False
        self._bulk = LowPriorityThread("prsm fetch store")  # hashes and writes received chunks (background.py)

    @property
    def providers(self) -> dict[ID, Provider]:
        return self.sched.providers

    # ------------------------------------------------------------ lifecycle

    def cancel(self) -> None:
        self._cancel.cancel()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    async def wait_until(self, predicate: Callable[[Fetch], bool]) -> None:
        """Block until ``predicate(self)`` holds or the fetch ends (tests and callers wait on this)."""
        while not predicate(self) and self.running:
            await self._changed.wait()

    async def run(self) -> None:
        """Run to the end; never raises but Cancelled (the outcome is in ``state``/``error``)."""
        try:
            with self._cancel:
                try:
                    await self._run()
                    self.state = "done"
                except ModelHalted as exc:
                    self.state, self.error, self.error_code = "halted", str(exc), "halted"
                    log.warning("fetch stopped: model halted", extra=kv(id=self.manifest_id.hex()[:16]))
                except (FetchFailed, ShardError) as exc:
                    self.state, self.error = "failed", str(exc)
                    quota = isinstance(exc, QuotaExceeded) or isinstance(exc.__cause__, QuotaExceeded)
                    self.error_code = "quota_exceeded" if quota else "fetch_failed"
                    log.warning("fetch failed", extra=kv(id=self.manifest_id.hex()[:16], error=str(exc)))
            if self._cancel.cancelled_caught:
                self.state, self.error = "cancelled", "cancelled"
        finally:
            if self.state not in ("done", "failed", "cancelled", "halted"):
                self.state, self.error = "cancelled", "the node is stopping"
            for ss in self._spares.values():
                await ss.aclose()
            self._bulk.close()
            self.finished = trio.current_time()
            self.done.set()
            self._notify()
        if self.state == "done":  # after `done`: the caller has its answer
            await self.providers_source.announce(self.manifest_id)

    def _check_halt(self) -> None:
        if self.is_halted(self.manifest_id):
            raise ModelHalted(f"model {self.manifest_id.hex()} was halted by the circuit breaker; fetch stopped")

    async def _run(self) -> None:
        self._check_halt()
        m = self.manifest = await self._resolve_manifest()
        self._check_halt()
        self.timings["resolve"] = trio.current_time() - self.started
        self._hashes = m.chunk_hashes()
        self.sched.chunk_size = m.chunk_size
        self.chunks_total, self.bytes_total = m.chunk_count, m.total_size
        mid = self.manifest_id
        present = await trio.to_thread.run_sync(self.store.present, mid)
        self._sizes = [span.length for span in m.chunk_spans()]
        missing = [i for i, held in enumerate(present) if not held]
        self.chunks_present = self.chunks_total - len(missing)
        self.bytes_present = self.bytes_total - sum(self._sizes[i] for i in missing)
        log.info("fetch started", extra=kv(id=mid.hex()[:16], name=m.name, version=m.version,
                                           chunks=self.chunks_total, missing=len(missing)))
        if not missing and await trio.to_thread.run_sync(self.store.is_complete, mid):
            paths = await trio.to_thread.run_sync(self.store.files, mid)
        else:
            paths = await self._write_model(m, missing)
        self.files = [str(p) for p in paths]
        stages = self.timings["resolve"] + self.timings.get("transfer", 0.0)
        self.timings["assemble"] = trio.current_time() - self.started - stages
        log.info("fetch done", extra=kv(id=mid.hex()[:16], fetched=self.chunks_fetched, present=self.chunks_present))

    async def _write_model(self, m: Manifest, missing: list[int]) -> list[Path]:
        """Fetch ``missing`` into the model's files and finish them; chunks of an earlier run
        found corrupt while finishing are fetched once more."""
        try:
            self._assembly = await trio.to_thread.run_sync(self.store.open_assembly, m)
        except OSError as exc:  # a full disk, permissions
            raise FetchFailed(f"cannot create the files of {m.name}:{m.version}: {exc}") from None
        try:
            for attempt in range(2):
                if missing:
                    self.state = "fetching"
                    await self._transfer(missing)
                self.timings["transfer"] = trio.current_time() - self.started - self.timings["resolve"]
                self._check_halt()
                self.state = "assembling"
                try:
                    return await trio.to_thread.run_sync(self._assembly.finish)
                except MissingChunks as exc:
                    if attempt:
                        raise FetchFailed(f"assembling {m.name}:{m.version} failed: {exc}") from None
                    log.warning("chunks of an earlier run found corrupt; fetching them again",
                                extra=kv(id=self.manifest_id.hex()[:16], chunks=len(exc.missing)))
                    missing = exc.missing
                    self.chunks_present -= len(missing)
                    self.bytes_present -= sum(self._sizes[i] for i in missing)
                except ShardError as exc:
                    raise FetchFailed(f"assembling {m.name}:{m.version} failed: {exc}") from None
            raise AssertionError("unreachable")
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._assembly.close)

    # ------------------------------------------------------------ manifest

    async def _resolve_manifest(self) -> Manifest:
        mid = self.manifest_id
        if await trio.to_thread.run_sync(self.store.has_manifest, mid):
            return await trio.to_thread.run_sync(self.store.get_manifest, mid)
        problems: list[str] = []
        candidates = self._candidates = await self._find_providers()
        for peer in candidates:
            try:
                ss = await ShardStream.open(self.host, self.kad, peer, open_timeout=self.params.open_timeout,
                                            response_timeout=self.params.response_timeout)
            except Unreachable as exc:
                problems.append(str(exc))
                continue
            try:
                data = await ss.get_manifest(mid)
                _, m = await trio.to_thread.run_sync(self.store.put_manifest, data)
            except QuotaExceeded:
                await ss.aclose()
                raise
            except RemoteError as exc:
                await ss.aclose()
                if exc.code is not ErrorCode.NOT_FOUND:
                    problems.append(f"{peer}: {exc}")
                continue
            except (ProtocolViolation, ShardError) as exc:
                await ss.aclose()
                log.warning("peer sent a bad manifest", extra=kv(peer=str(peer), error=str(exc)))
                problems.append(f"{peer} sent a bad manifest: {type(exc).__name__}: {exc}")
                continue
            except PEER_ERRORS as exc:
                await ss.aclose()
                problems.append(f"{peer}: {exc!r}")
                continue
            self._spares[peer] = ss
            return m
        detail = f": {'; '.join(problems[:3])}" if problems else ""
        raise NoProviders(f"no peer serves manifest {mid.hex()} ({len(candidates)} asked){detail}")

    # ------------------------------------------------------------ providers

    async def _find_providers(self) -> list[ID]:
        started = trio.current_time()
        try:
            return await self.providers_source.find(self.manifest_id)
        finally:
            self.timings["lookup"] = self.timings.get("lookup", 0.0) + trio.current_time() - started

    async def _ask_have(self, peers: list[ID]) -> None:
        """HAVE to each peer at once; a peer that holds some of what we need becomes a provider."""
        assert self.manifest is not None
        count = self.manifest.chunk_count
        providers = self.sched.providers

        async def ask(peer: ID) -> None:
            ss = self._spares.pop(peer, None)
            try:
                if ss is None:
                    ss = await ShardStream.open(self.host, self.kad, peer, open_timeout=self.params.open_timeout,
                                                response_timeout=self.params.response_timeout)
                reply = await ss.have(self.manifest_id, count)
            except (RemoteError, ProtocolViolation, Unreachable, *PEER_ERRORS) as exc:
                log.debug("HAVE failed", extra=kv(peer=str(peer), error=repr(exc)))
                if ss is not None:
                    await ss.aclose()
                return
            have = set(reply.indices())
            known = providers.get(peer)
            if known is not None:
                known.have = have
                await ss.aclose()
            elif have:
                providers[peer] = Provider(peer, have, spare=ss)
            else:
                await ss.aclose()

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer != self.host.get_id() and not (peer in providers and providers[peer].dropped):
                    nursery.start_soon(ask, peer)

    def _activate(self) -> None:
        """Start workers for the most useful idle providers, as many as the ramp allows (schedule.py)."""
        assert self._nursery is not None
        for p in self.sched.to_activate():
            for _ in range(self.params.streams_per_peer):
                self.sched.workers += 1
                p.workers += 1
                self._nursery.start_soon(self._worker, p)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ the transfer

    async def _transfer(self, missing: list[int]) -> None:
        assert self.manifest is not None
        sched = self.sched
        candidates, self._candidates = self._candidates, None  # one DHT lookup, not two, for a new model
        if candidates is None:
            candidates = await self._find_providers()
        await self._ask_have(candidates)
        sched.start(missing)
        rediscoveries = 0
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while not sched.finished() and self._fatal is None:
                if self.is_halted(self.manifest_id):
                    self._fatal = ModelHalted(f"model {self.manifest_id.hex()} was halted by the circuit "
                                              "breaker; fetch stopped")
                    break
                self._activate()
                stuck = sched.stuck()
                untried = [i for i in stuck if i not in self._ipfs_tried] if self.ipfs is not None else []
                if untried:
                    try:
                        await self._from_ipfs(untried)
                    except Exception as exc:  # a disk error, or a bug: fatal, like a worker's
                        self._fatal = exc
                        break
                    continue
                if stuck:
                    if rediscoveries >= MAX_REDISCOVERIES:
                        break
                    rediscoveries += 1
                    await self._ask_have(await self._find_providers())
                    continue
                with trio.move_on_after(HALT_POLL):  # a halt comes with no event of ours
                    await self._changed.wait()
            nursery.cancel_scope.cancel()
        if self._fatal is not None:
            if isinstance(self._fatal, FetchFailed):
                raise self._fatal
            if isinstance(self._fatal, ShardError):
                raise FetchFailed(str(self._fatal)) from self._fatal
            raise FetchFailed(f"fetch failed: {self._fatal!r}") from self._fatal
        stuck = sched.stuck()
        if stuck:
            asked = len(sched.providers)
            raise NoProviders(f"no reachable provider holds {len(stuck)} chunks (first: {stuck[:8]}); "
                              f"{asked} providers tried, {self.chunks_fetched} chunks fetched, run again to resume")

    async def _from_ipfs(self, indices: list[int]) -> None:
        """Ask IPFS for chunks no live provider holds; each is verified before it is written."""
        assert self.ipfs is not None and self._assembly is not None
        self._ipfs_tried.update(indices)
        ipfs, hashes, assembly = self.ipfs, self._hashes, self._assembly

        def pull() -> list[tuple[int, int]]:
            got = []
            for i in indices:
                data = ipfs.get(hashes[i])
                if data is None or hashlib.sha256(data).digest() != hashes[i]:
                    continue  # IpfsBlocks checked it already; never trust twice-removed
                assembly.write(i, data)
                got.append((i, len(data)))
            return got

        got = await trio.to_thread.run_sync(pull)
        self._flush_when_due()
        for i, size in got:
            if i in self.sched.pending:
                self.sched.pending.discard(i)
                self.chunks_fetched += 1
                self.bytes_fetched += size
                self.chunks_from_ipfs += 1
        log.info("chunks from ipfs", extra=kv(id=self.manifest_id.hex()[:16], asked=len(indices),
                                             got=self.chunks_from_ipfs))
        self._notify()

    # ------------------------------------------------------------ workers

    async def _worker(self, p: Provider) -> None:
        """Batches from ``p`` over one reused stream, pipelined: the next GET_CHUNKS is sent
        before the current answer is read, so the provider never waits for a round trip. A
        batch's chunks are verified and written (:class:`Landing`) while the stream goes on
        with the next batch: the worker never waits on a hash or a disk write to ask for more."""
        ss, p.spare = p.spare, None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._worker_loop(p, ss, Landing(self, p, nursery))
                except Exception as exc:  # a halt, a disk error or a bug: the whole fetch fails with it
                    if self._fatal is None:
                        self._fatal = exc
        finally:
            self.sched.stopped(p)
            self._notify()

    async def _worker_loop(self, p: Provider, ss: ShardStream | None, landing: Landing) -> None:
        sched = self.sched
        ahead: list[int] = []  # requested on ``ss``, answer not read yet
        try:
            while not p.dropped and (ahead or not p.parked) and not sched.finished():  # parked: after ``ahead``
                wait = p.resume_at - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                self._check_halt()  # between batches: a halted model gets no further request
                batch, requested, ahead = (ahead, True, []) if ahead else (sched.take(p), False, [])
                if not batch:
                    await self._changed.wait()
                    continue
                ok = False
                try:
                    if not requested:
                        if ss is None or ss.worn_out:
                            if ss is not None:
                                await ss.aclose()
                            ss = None
                            ss = await ShardStream.open(self.host, self.kad, p.peer,
                                                        open_timeout=self.params.open_timeout,
                                                        response_timeout=self.params.response_timeout)
                        await ss.request_chunks(self.manifest_id, batch)
                    assert ss is not None
                    if self.params.pipeline and not ss.worn_out and not p.parked \
                            and not self.is_halted(self.manifest_id):
                        ahead = sched.take(p)
                        if ahead:
                            await ss.request_chunks(self.manifest_id, ahead)
                    await self._fetch_batch(p, ss, batch, landing)
                    p.backoff = 0.0
                    ok = True
                except RemoteError as exc:
                    if exc.code is ErrorCode.BUSY:
                        p.backoff = min(max(2 * p.backoff, self.params.busy_backoff), self.params.busy_backoff_max)
                        p.resume_at = trio.current_time() + p.backoff
                    elif exc.code is ErrorCode.INTERNAL:
                        sched.penalise(p, str(exc))
                    else:
                        sched.drop(p, str(exc))
                except (ProtocolViolation, Unreachable) as exc:
                    sched.drop(p, str(exc))
                except PEER_ERRORS as exc:
                    sched.penalise(p, f"transfer broke: {exc!r}")
                finally:
                    landing.close(batch)  # what did not land goes back to the queue once the rest did
                    if not ok:  # the stream's position is unknown: start afresh
                        sched.requeue(ahead, p)
                        ahead = []
                        if ss is not None:
                            await ss.aclose()
                            ss = None
        finally:
            sched.requeue(ahead, p)
            if ss is not None:
                await ss.aclose()

    async def _fetch_batch(self, p: Provider, ss: ShardStream, batch: list[int], landing: Landing) -> None:
        """Read the answer to one GET_CHUNKS (already sent). Received chunks go to ``landing``
        (verified and written in worker threads) a ``store_flush_bytes`` group at a time; this
        returns once the answer was read, not waiting for them."""
        assert self.manifest is not None
        chunk_size = self.manifest.chunk_size
        started = trio.current_time()
        expected = 0
        buffer: list[ChunkMsg] = []
        buffered = 0
        while (chunk := await ss.next_chunk(chunk_size)) is not None:
            if "first_chunk" not in self.timings:
                self.timings["first_chunk"] = trio.current_time() - self.started
            if p.dropped:  # a chunk of an earlier group failed verification too often
                raise ProtocolViolation(p.dropped)
            try:
                at = batch.index(chunk.index, expected)
            except ValueError:
                raise ProtocolViolation(
                    f"{p.peer} sent chunk {chunk.index}, not requested or out of order") from None
            p.have.difference_update(batch[expected:at])  # skipped: it does not hold them after all
            expected = at + 1
            buffer.append(chunk)
            buffered += len(chunk.data)
            if buffered >= self.params.store_flush_bytes:
                await landing.add(buffer, buffered)
                buffer, buffered = [], 0
        if buffer:
            await landing.add(buffer, buffered)
        p.have.difference_update(batch[expected:])
        p.busy += trio.current_time() - started
        self.sched.check_slow()

    async def _store(self, p: Provider, chunks: list[ChunkMsg]) -> None:
        """Verify received chunks and write the good ones into the model's files (one thread
        call); a chunk that fails verification penalises ``p`` and stays in flight, so the
        caller requeues it for the others."""
        if not chunks:
            return
        hashes = self._hashes
        assembly = self._assembly
        assert assembly is not None

        def write() -> list[bool]:
            ok = []
            for c in chunks:
                good = hashlib.sha256(c.data).digest() == hashes[c.index]
                if good:
                    assembly.write(c.index, c.data)
                ok.append(good)
            return ok

        results = await self._bulk.run(write)
        self._flush_when_due()
        self.sched.received(sum(len(c.data) for c, ok in zip(chunks, results, strict=True) if ok),
                            trio.current_time())
        for c, ok in zip(chunks, results, strict=True):
            if ok:
                if self.sched.done(c.index):
                    self.chunks_fetched += 1
                    self.bytes_fetched += len(c.data)
                p.chunks += 1
                p.bytes += len(c.data)
            else:
                self.bad_chunks += 1
                p.bad_chunks += 1
                p.have.discard(c.index)
                self.sched.penalise(p, f"chunk {c.index} failed verification")
        self._notify()

    def _flush_when_due(self) -> None:
        """Flush the files and record what was written, in a task of its own: an fdatasync can
        take long, and the workers go on receiving meanwhile."""
        assembly = self._assembly
        if assembly is None or self._flushing or not assembly.flush_due or self._nursery is None:
            return
        self._flushing = True

        async def flush() -> None:
            try:
                await trio.to_thread.run_sync(assembly.flush)
            except Exception as exc:  # a disk error: the fetch fails with it
                if self._fatal is None:
                    self._fatal = exc
                self._notify()
            finally:
                self._flushing = False

        self._nursery.start_soon(flush)

    # ------------------------------------------------------------ progress

    def progress(self) -> dict[str, Any]:
        m = self.manifest
        now = self.finished if self.finished is not None else trio.current_time()
        elapsed = max(now - self.started, 1e-9)
        rate = self.bytes_fetched / elapsed
        done = self.bytes_present + self.bytes_fetched
        remaining = max(self.bytes_total - done, 0)
        return {
            "id": self.manifest_id.hex(),
            "name": m.name if m else None,
            "version": m.version if m else None,
            "state": self.state,
            "error": self.error,
            "error_code": self.error_code,
            "chunks_total": self.chunks_total,
            "chunks_present": self.chunks_present,
            "chunks_fetched": self.chunks_fetched,
            "chunks_from_ipfs": self.chunks_from_ipfs,
            "bad_chunks": self.bad_chunks,
            "bytes_total": self.bytes_total,
            "bytes_done": done,
            "bytes_fetched": self.bytes_fetched,
            "elapsed_s": round(elapsed, 3),
            "rate_bps": round(rate),
            "eta_s": round(remaining / rate, 1) if rate > 0 and self.state == "fetching" else None,
            "path": str(self.dest) if self.state == "done" else None,
            "files": self.files,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "providers": [p.json() for p in self.providers.values()],
            "ramp": {"providers": self.sched.target, "settled": self.sched.ramp_settled,
                     "reopened": self.sched.ramp_reopened,
                     "steps": [[n, round(rate)] for n, rate in self.sched.ramp_steps]},
        }


class Landing:
    """One worker's received chunks on their way to disk. Each group given to :meth:`add` is
    verified and written by ``Fetch._store`` in a task (and a thread) of its own, while the
    worker reads on; at most ``max_request_bytes`` of them at once (more waits in :meth:`add`:
    the memory a slow disk can hold up is bounded). A batch given to :meth:`close` is requeued, its
    chunks that did not land (never received, or failed verification), once all of its groups
    given so far are done: never earlier, so no chunk on its way to disk is asked of anyone
    else. A disk error (or a bug) in a group fails the fetch, as it would in the worker."""

    def __init__(self, fetch: Fetch, p: Provider, nursery: trio.Nursery) -> None:
        self.fetch = fetch
        self.p = p
        self.nursery = nursery
        self.limit = max(fetch.params.max_request_bytes, fetch.params.store_flush_bytes)
        self.bytes = 0  # given to stores, not written yet
        self._closed: list[tuple[int, list[int]]] = []  # (groups given before it, batch), in order
        self._given = 0  # groups given since the start: the next one's number
        self._running: set[int] = set()  # numbers of the groups given, not done
        self._room = trio.Event()

    async def add(self, chunks: list[ChunkMsg], size: int) -> None:
        while self.bytes and self.bytes + size > self.limit:
            await self._room.wait()
        self.bytes += size
        number, self._given = self._given, self._given + 1
        self._running.add(number)
        self.nursery.start_soon(self._land, number, chunks, size)

    def close(self, batch: list[int]) -> None:
        """``batch`` is read (or its transfer broke): requeue what did not land, once the
        groups given so far are done (groups land in any order)."""
        if batch:
            self._closed.append((self._given, batch))
            self._requeue_landed()

    def _requeue_landed(self) -> None:
        first_running = min(self._running, default=self._given)
        while self._closed and self._closed[0][0] <= first_running:
            self.fetch.sched.requeue(self._closed.pop(0)[1], self.p)

    async def _land(self, number: int, chunks: list[ChunkMsg], size: int) -> None:
        fetch = self.fetch
        try:
            await fetch._store(self.p, chunks)
        except Exception as exc:  # a disk error, or a bug: the whole fetch fails with it
            if fetch._fatal is None:
                fetch._fatal = exc
            fetch._notify()
        finally:
            self.bytes -= size
            self._running.discard(number)
            self._room.set()
            self._room = trio.Event()
            self._requeue_landed()
