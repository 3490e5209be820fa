"""The model runtime: loads models within a memory budget and serves batched inference.

``ModelRuntime`` is a service: ``serve()`` owns one nursery with a batcher task per loaded
model. A caller does ``await runtime.load(model_id, spec, weights)`` once, then any number of
concurrent ``await runtime.run(model_id, inputs)``; requests for one model that arrive while
its previous batch runs (or within ``max_batch_wait_s`` of the first) run together in one
forward pass, up to ``max_batch_size`` items. Inference and loading run in worker threads
(inference on one device thread, ``device.py``; loading with ``trio.to_thread.run_sync``), so
the event loop never blocks; while a batch runs, the next one fills up and is queued right
behind it, so the device goes from one forward pass straight to the next.

torch is imported only by the first ``load()``, in a worker thread: a node that runs no model
never pays for it.

Cancelling a caller of ``run()`` withdraws its request: if it was still queued it never runs;
if its batch was already running, the batch finishes and that request's result is dropped.
Memory is accounted, not measured: a model reserves its parameter bytes plus its family's
working estimate for a full batch; a load that does not fit evicts idle models, least recently
used first, and is refused if that is not enough.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio

from .._trio import TaskStatus
from ..exceptions import ConfigError
from .device import DeviceThread
from .exceptions import (
    DeviceUnavailable,
    InferenceFailed,
    MemoryBudgetExceeded,
    ModelAlreadyLoaded,
    ModelNotLoaded,
    ModelUnloaded,
    RuntimeBusy,
    RuntimeClosed,
)
from .inputs import ClassifyInput, EmbedInput, GenerateInput, ModelInput, RunResult, Usage, parse_input
from .specs import CLASSIFIER_FAMILY, EMBEDDER_FAMILY, FAMILY_TAGS, LM_FAMILY, ModelSpec, parse_spec

DEVICES = ("auto", "cpu", "cuda")
DEVICE_DEPTH = 3  # jobs handed to the device thread: one running, up to two queued
BATCHES_PER_JOB = 8  # full batches one device job may run back to back (while the device is busy)
WeightSource = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class RuntimeConfig:
    """The ``[agents]`` settings of the runtime."""

    device: str = "auto"  # "auto": cuda when torch sees one, else cpu; "cpu" forces the CPU
    memory_limit_bytes: int = 4 << 30
    max_batch_size: int = 16  # items per forward pass: prompts, texts to embed, inputs to classify
    max_batch_wait_s: float = 0.005  # how long a first request waits for company
    max_queue: int = 1024  # queued requests per model before RuntimeBusy
    torch_threads: int = 0  # intra-op CPU threads for torch; 0 leaves torch's default

    @classmethod
    def for_tests(cls) -> RuntimeConfig:
        return cls(device="cpu", memory_limit_bytes=256 << 20, max_batch_wait_s=0.0, torch_threads=1)

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"[agents].device must be one of {list(DEVICES)}")
        if self.memory_limit_bytes < 0:
            raise ConfigError("[agents].memory_limit_bytes must be >= 0")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError("[agents].max_batch_size must be in [1, 1024]")
        if not 0.0 <= self.max_batch_wait_s <= 10.0:
            raise ConfigError("[agents].max_batch_wait_s must be in [0, 10]")
        if self.max_queue < 1:
            raise ConfigError("[agents].max_queue must be >= 1")
        if not 0 <= self.torch_threads <= 256:
            raise ConfigError("[agents].torch_threads must be in [0, 256]")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    family: str
    tags: tuple[str, ...]
    param_count: int
    reserved_bytes: int
    device: str


@dataclass(frozen=True)
class ModelStatistics:
    model_id: str
    family: str
    reserved_bytes: int
    queue_length: int
    running: int
    served: int
    batches: int
    last_used: int


@dataclass(frozen=True)
class RuntimeStatistics:
    """What ``agents status`` shows. ``device`` is the configured one until a load resolves it."""

    device: str
    memory_limit_bytes: int
    bytes_in_use: int
    models: tuple[ModelStatistics, ...]
    queue_length: int
    tasks_served: int
    tasks_cancelled: int
    batches: int
    evictions: int

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "models"}
        d["models"] = [m.__dict__.copy() for m in self.models]
        return d


@dataclass(eq=False)
class _Request:
    input: ModelInput
    done: trio.Event = field(default_factory=trio.Event)
    result: RunResult | None = None
    error: Exception | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Model:
    info: ModelInfo
    spec: ModelSpec
    module: Any
    queue: deque[_Request] = field(default_factory=deque)
    running: list[_Request] = field(default_factory=list)
    wakeup: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    closed_error: Exception | None = None
    served: int = 0
    batches: int = 0
    last_used: int = 0

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running

    def full(self, batch_size: int) -> bool:
        """Whether the queue holds a full batch (counted lazily: the queue may be long)."""
        total = 0
        for r in self.queue:
            total += r.input.items
            if total >= batch_size:
                return True
        return False


_INPUT_TYPES: dict[str, type[ModelInput]] = {
    LM_FAMILY: GenerateInput, EMBEDDER_FAMILY: EmbedInput, CLASSIFIER_FAMILY: ClassifyInput,
}


def _parsed(spec: ModelSpec, raw: object) -> ModelInput:
    """``raw`` validated for ``spec``; an input validated before (by the task server) as is."""
    if isinstance(raw, _INPUT_TYPES[spec.family]):
        return raw
    return parse_input(spec, raw)


def _resolve_device(wanted: str, torch_threads: int) -> str:
    import torch  # the first import costs ~2 s: this runs in a worker thread

    if torch_threads:
        torch.set_num_threads(torch_threads)
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise DeviceUnavailable("[agents].device is 'cuda' but torch sees no CUDA device")
    return "cpu"


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _check(spec: ModelSpec, weights: WeightSource) -> list[Path]:
    from .weights import check_files, weight_files

    files = weight_files(weights)
    check_files(spec, files)
    return files


def _load(spec: ModelSpec, files: list[Path], device: str) -> Any:
    from .weights import load_module

    return load_module(spec, files, device)


def _run(spec: ModelSpec, module: Any, inputs: list[ModelInput], device: str) -> tuple[list[Any], float]:
    """Run a batch; its results and wall time in ms (on the device thread)."""
    import torch

    from .architectures import run_batch

    start = time.perf_counter()
    results = run_batch(spec, module, inputs, torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return results, (time.perf_counter() - start) * 1000.0


def _run_batches(
    spec: ModelSpec, module: Any, batches: list[list[ModelInput]], device: str
) -> list[tuple[list[Any], float] | Exception]:
    """Run batches one after another (one device job); each one's outcome: a batch that fails
    (torch's errors: device out of memory, ...) fails alone."""
    out: list[tuple[list[Any], float] | Exception] = []
    for inputs in batches:
        try:
            out.append(_run(spec, module, inputs, device))
        except Exception as e:
            out.append(e)
    return out


class ModelRuntime:
    """Loaded models and their batchers. Start it with ``nursery.start(runtime.serve)`` (or
    ``open_runtime``); ``load``/``run``/``unload`` before that raise RuntimeClosed."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.config.validate()
        self._nursery: trio.Nursery | None = None
        self._device: str | None = None
        self._models: dict[str, _Model] = {}
        self._loading: dict[str, int] = {}  # model id -> bytes reserved while it loads
        self._device_thread = DeviceThread()
        self._device_slots = trio.CapacityLimiter(DEVICE_DEPTH)
        self._load_limiter = trio.CapacityLimiter(1)
        self._tick = 0
        self._served = 0
        self._cancelled = 0
        self._batches = 0
        self._evictions = 0

    # ------------------------------------------------------------ service

    async def serve(self, *, task_status: TaskStatus[ModelRuntime] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._models.clear()
            self._device_thread.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_open(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeClosed("the model runtime is not running")
        return self._nursery

    @property
    def device(self) -> str:
        return self._device or self.config.device

    # ------------------------------------------------------------ loading

    def bytes_in_use(self) -> int:
        return sum(m.info.reserved_bytes for m in self._models.values()) + sum(self._loading.values())

    def loaded(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    async def load(self, model_id: str, spec: object, weights: WeightSource) -> ModelInfo:
        """Load a model from its spec and safetensors weights (a folder or a list of files).

        Raises InvalidSpec, InvalidWeights, MemoryBudgetExceeded, ModelAlreadyLoaded,
        DeviceUnavailable."""
        nursery = self._check_open()
        if model_id in self._models or model_id in self._loading:
            raise ModelAlreadyLoaded(model_id)
        parsed = parse_spec(spec)
        need = parsed.param_bytes() + parsed.working_bytes(self.config.max_batch_size)
        if need > self.config.memory_limit_bytes:
            raise MemoryBudgetExceeded(need, self.config.memory_limit_bytes, self.config.memory_limit_bytes)
        self._loading[model_id] = 0
        try:
            if self._device is None:
                resolved = await trio.to_thread.run_sync(
                    _resolve_device, self.config.device, self.config.torch_threads, limiter=self._load_limiter
                )
                if self.config.torch_threads:  # OpenMP's thread count is per calling thread: set it
                    await self._device_thread.run(_set_threads, self.config.torch_threads)  # where batches run
                self._device = resolved
            device = self._device
            # bad weights must not cost another model its place: check them before evicting
            files = await trio.to_thread.run_sync(_check, parsed, weights, limiter=self._load_limiter)
            self._make_room(need)
            self._loading[model_id] = need
            module = await trio.to_thread.run_sync(_load, parsed, files, device, limiter=self._load_limiter)
        finally:
            del self._loading[model_id]
        if self._nursery is not nursery:
            raise RuntimeClosed("the model runtime stopped while loading")
        self._tick += 1
        info = ModelInfo(model_id, parsed.family, FAMILY_TAGS[parsed.family], parsed.param_count(), need, device)
        model = _Model(info=info, spec=parsed, module=module, last_used=self._tick)
        self._models[model_id] = model
        nursery.start_soon(self._batcher, model)
        return info

    def _make_room(self, need: int) -> None:
        """Evict idle models, least recently used first, until ``need`` bytes fit; evict
        nothing and raise if even evicting every idle model would not be enough."""
        limit = self.config.memory_limit_bytes
        free = limit - self.bytes_in_use()
        idle = sorted((m for m in self._models.values() if m.idle), key=lambda m: m.last_used)
        if need > free + sum(m.info.reserved_bytes for m in idle):
            raise MemoryBudgetExceeded(need, free + sum(m.info.reserved_bytes for m in idle), limit)
        for model in idle:
            if need <= free:
                break
            free += model.info.reserved_bytes
            self._evictions += 1
            self._close(model, ModelUnloaded(f"{model.info.model_id} was evicted"))

    def _close(self, model: _Model, error: Exception) -> None:
        if self._models.get(model.info.model_id) is model:
            del self._models[model.info.model_id]
        model.closed_error = error
        model.scope.cancel()

    async def unload(self, model_id: str) -> None:
        """Unload a model now (e.g. a circuit-breaker halt): its queued requests fail with
        ModelUnloaded; a batch already running finishes and delivers. Returns once its batcher
        has stopped, so the model is no longer running anything."""
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotLoaded(model_id)
        self._close(model, ModelUnloaded(f"{model_id} was unloaded"))
        await model.stopped.wait()

    # ------------------------------------------------------------ inference

    async def run(self, model_id: str, inputs: object) -> RunResult:
        """Run one request; raises InvalidInput, ModelNotLoaded, RuntimeBusy, ModelUnloaded,
        InferenceFailed. Cancelling the caller withdraws the request."""
        outcome = (await self.run_many(model_id, [inputs]))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def run_many(self, model_id: str, inputs: Sequence[object]) -> list[RunResult | Exception]:
        """Run several requests at once (a batched task): they are queued together, in order,
        so they share forward passes with each other and with other callers' requests. Each
        outcome is a RunResult, or the error of the batch its request ran in (InferenceFailed).
        Raises InvalidInput (any input), ModelNotLoaded, RuntimeBusy (the queue cannot take
        them all), ModelUnloaded. Cancelling the caller withdraws the requests not yet run.
        An input may be given already parsed (a ModelInput of the model's family)."""
        self._check_open()
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotLoaded(model_id)
        requests = [_Request(_parsed(model.spec, raw)) for raw in inputs]
        if len(model.queue) + len(requests) > self.config.max_queue:
            raise RuntimeBusy(f"{model_id}: {len(model.queue)} requests queued")
        self._tick += 1
        model.last_used = self._tick
        model.queue.extend(requests)
        model.wakeup.set()
        try:
            for request in requests:
                await request.done.wait()
        except trio.Cancelled:
            for request in requests:
                if not request.done.is_set():
                    request.cancelled = True
                    if request in model.queue:
                        model.queue.remove(request)
                    self._cancelled += 1
            raise
        out: list[RunResult | Exception] = []
        for request in requests:
            if request.error is not None and not isinstance(request.error, InferenceFailed):
                raise request.error  # the model went away: nothing of it ran to the end
            out.append(request.error or request.result)  # type: ignore[arg-type]
        return out

    async def _wait_wakeup(self, model: _Model) -> None:
        model.wakeup = trio.Event()
        await model.wakeup.wait()

    def _take_batch(self, model: _Model) -> list[_Request]:
        """Queued requests in arrival order, up to max_batch_size items (at least one request)."""
        batch: list[_Request] = []
        items = 0
        while model.queue:
            size = model.queue[0].input.items
            if batch and items + size > self.config.max_batch_size:
                break
            batch.append(model.queue.popleft())
            items += size
        return batch

    async def _batcher(self, model: _Model) -> None:
        """Forms batches and hands them to the device thread. While the device is busy, the
        next batch fills up (up to max_batch_size items) and, once full, is queued right behind
        the running one, so that the device goes from one forward pass straight to the next.

        Full batches already waiting when the device is busy go in one job, up to
        BATCHES_PER_JOB: each job handed to the device thread and back costs the event loop a
        wake-up and some work, and the forward passes on the device thread slow down while the
        loop's thread runs (it competes for the GIL and, on a small machine, for the core). A
        batch's results may then come back up to BATCHES_PER_JOB - 1 forward passes later (and
        the device thread holds finished jobs' results while more are queued, up to
        ``device.HOLD_S``: with 8 batches a job, a burst of 10 full batches is three jobs, all
        handed to the device at once and handed back in one wake-up; see ``device.py``)."""
        cfg = self.config
        slots = self._device_slots
        try:
            with model.scope:
                async with trio.open_nursery() as forwards:
                    while True:
                        while not model.queue:
                            await self._wait_wakeup(model)
                        if slots.borrowed_tokens:
                            while model.queue and not model.full(cfg.max_batch_size) and slots.borrowed_tokens:
                                await self._wait_wakeup(model)
                        elif cfg.max_batch_wait_s > 0:
                            with trio.move_on_after(cfg.max_batch_wait_s):
                                while not model.full(cfg.max_batch_size):
                                    await self._wait_wakeup(model)
                        batches = [self._take_batch(model)]
                        if not batches[0]:
                            continue
                        full = cfg.max_batch_size
                        while slots.borrowed_tokens and len(batches) < BATCHES_PER_JOB and model.full(full):
                            batches.append(self._take_batch(model))
                        for batch in batches:
                            model.running.extend(batch)
                        token = object()
                        await slots.acquire_on_behalf_of(token)
                        forwards.start_soon(self._run_job, model, batches, token)
        finally:
            error = model.closed_error or RuntimeClosed("the model runtime stopped")
            for request in [*model.running, *model.queue]:
                if not request.done.is_set():
                    request.error = error
                    request.done.set()
            model.queue.clear()
            model.running = []
            model.module = None
            model.stopped.set()

    async def _run_job(self, model: _Model, batches: list[list[_Request]], token: object) -> None:
        """Run batches on the device as one job (holding the slot the batcher took for it) and
        deliver each batch's results."""
        device = model.info.device
        try:
            outcomes = await self._device_thread.run(
                _run_batches, model.spec, model.module, [[r.input for r in batch] for batch in batches], device)
            for batch, result in zip(batches, outcomes, strict=True):
                self._deliver(model, batch, result)
        finally:
            self._device_slots.release_on_behalf_of(token)
            for m in self._models.values():  # the device is free: batchers waiting on it may go
                m.wakeup.set()

    def _deliver(self, model: _Model, batch: list[_Request], result: tuple[list[Any], float] | Exception) -> None:
        device = model.info.device
        if isinstance(result, Exception):
            for request in batch:
                request.error = InferenceFailed(f"{model.info.model_id}: {type(result).__name__}: {result}")
                request.done.set()
        else:
            results, wall_ms = result
            model.batches += 1
            self._batches += 1
            for request, (output, tokens_in, tokens_out) in zip(batch, results, strict=True):
                if request.cancelled:
                    continue  # its caller is gone: the result is dropped
                usage = Usage(tokens_in, tokens_out, round(wall_ms, 3), len(batch), device)
                request.result = RunResult(output, usage)
                model.served += 1
                self._served += 1
                request.done.set()
        finished = set(map(id, batch))
        model.running = [r for r in model.running if id(r) not in finished]

    # ------------------------------------------------------------ status

    def statistics(self) -> RuntimeStatistics:
        models = tuple(
            ModelStatistics(
                model_id=m.info.model_id,
                family=m.info.family,
                reserved_bytes=m.info.reserved_bytes,
                queue_length=len(m.queue),
                running=len(m.running),
                served=m.served,
                batches=m.batches,
                last_used=m.last_used,
            )
            for m in self._models.values()
        )
        return RuntimeStatistics(
            device=self.device,
            memory_limit_bytes=self.config.memory_limit_bytes,
            bytes_in_use=self.bytes_in_use(),
            models=models,
            queue_length=sum(m.queue_length for m in models),
            tasks_served=self._served,
            tasks_cancelled=self._cancelled,
            batches=self._batches,
            evictions=self._evictions,
        )


@asynccontextmanager
async def open_runtime(config: RuntimeConfig | None = None) -> AsyncIterator[ModelRuntime]:
    """A running ModelRuntime for the duration of the block (tests, scripts, small tools)."""
    runtime = ModelRuntime(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.serve)
        try:
            yield runtime
        finally:
            nursery.cancel_scope.cancel()
