"""The model runtime: families run deterministically, requests batch, cancel, and fit a budget.

Nothing here waits on time: a gate holds each batch in its worker thread until the test lets it
go, and ``wait_all_tasks_blocked`` tells when every request has queued.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from prsm_node.agents import (
    DeviceUnavailable,
    InferenceFailed,
    InvalidInput,
    InvalidWeights,
    MemoryBudgetExceeded,
    ModelAlreadyLoaded,
    ModelNotLoaded,
    ModelRuntime,
    ModelUnloaded,
    RunResult,
    RuntimeClosed,
    RuntimeConfig,
    open_runtime,
    parse_spec,
)
from prsm_node.agents import runtime as runtime_module
from prsm_node.agents.architectures import build_module
from prsm_node.agents.weights import save_module

from .test_agents_specs import CLF, EMB, LM, with_config


def make_model(root: Path, name: str, raw: dict[str, Any], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder = root / name
    folder.mkdir()
    save_module(build_module(parse_spec(raw)), folder / "model.safetensors")
    return folder


def need(raw: dict[str, Any], cfg: RuntimeConfig) -> int:
    spec = parse_spec(raw)
    return spec.param_bytes() + spec.working_bytes(cfg.max_batch_size)


class Gate:
    """Holds every batch in its worker thread until ``allow()``; records each batch's inputs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[Any]] = []
        self._allowed = threading.Semaphore(0)
        self._entered = 0
        self._changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        run = runtime_module._run

        def gated(*args: Any) -> Any:
            self.batches.append(list(args[2]))
            trio.from_thread.run_sync(self._enter, trio_token=self._token)
            assert self._allowed.acquire(timeout=10)  # only a failing test waits this long
            return run(*args)

        monkeypatch.setattr(runtime_module, "_run", gated)

    def _enter(self) -> None:
        self._entered += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_entered(self, n: int) -> None:
        """Until ``n`` batches in all have entered their worker thread."""
        while self._entered < n:
            await self._changed.wait()

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._allowed.release()


@pytest.fixture
async def rt() -> AsyncIterator[ModelRuntime]:
    async with open_runtime(RuntimeConfig.for_tests()) as runtime:
        yield runtime


async def collect(nursery: trio.Nursery, fn: Callable[[], Any], results: dict[Any, Any], key: Any) -> None:
    async def one() -> None:
        results[key] = await fn()

    nursery.start_soon(one)


# ------------------------------------------------------------ each family


async def test_each_family_runs_deterministically(rt: ModelRuntime, tmp_path: Path) -> None:
    await rt.load("lm", LM, make_model(tmp_path, "lm", LM))
    await rt.load("emb", EMB, make_model(tmp_path, "emb", EMB))
    info = await rt.load("clf", CLF, [make_model(tmp_path, "clf", CLF) / "model.safetensors"])
    assert info.tags == ("classifier",) and info.device == "cpu"

    req = {"prompt": "the prism", "max_new_tokens": 12, "temperature": 1.0, "top_k": 10, "seed": 7}
    first = await rt.run("lm", req)
    assert isinstance(first.output, str) and len(first.output) == 12
    assert (await rt.run("lm", req)).output == first.output
    others = {(await rt.run("lm", {**req, "seed": s})).output for s in range(4)}
    assert len(others) > 1  # the seed matters when sampling...
    greedy = {(await rt.run("lm", {**req, "temperature": 0.0, "seed": s})).output for s in range(3)}
    assert len(greedy) == 1  # ...and not when decoding greedily
    assert (first.usage.tokens_in, first.usage.tokens_out, first.usage.device) == (9, 12, "cpu")

    emb = await rt.run("emb", {"texts": ["light", "colours of thin plates", "light"]})
    vectors = emb.output
    assert isinstance(vectors, list) and len(vectors) == 3 and all(len(v) == 16 for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-5 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)

    clf = await rt.run("clf", {"text": "the refraction of light"})
    assert isinstance(clf.output, dict) and set(clf.output) == {"light", "colour"}
    assert sum(clf.output.values()) == pytest.approx(1.0, abs=1e-6)
    assert (await rt.run("clf", {"text": "the refraction of light"})).output == clf.output


async def test_vector_classifier(rt: ModelRuntime, tmp_path: Path) -> None:
    raw = with_config(CLF, input="vector", input_dim=4)
    await rt.load("vec", raw, make_model(tmp_path, "vec", raw))
    out = (await rt.run("vec", {"vector": [0.1, -2, 3, 0.5]})).output
    assert isinstance(out, dict) and sum(out.values()) == pytest.approx(1.0, abs=1e-6)


async def test_errors(rt: ModelRuntime, tmp_path: Path) -> None:
    folder = make_model(tmp_path, "clf", CLF)
    await rt.load("clf", CLF, folder)
    with pytest.raises(ModelAlreadyLoaded):
        await rt.load("clf", CLF, folder)
    with pytest.raises(ModelNotLoaded):
        await rt.run("nope", {"text": "x"})
    with pytest.raises(InvalidInput):
        await rt.run("clf", {"text": "x", "extra": 1})
    assert rt.statistics().tasks_served == 0


async def test_inference_failure_fails_the_batch_only(
    rt: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    run = runtime_module._run
    monkeypatch.setattr(runtime_module, "_run", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    with pytest.raises(InferenceFailed, match="out of memory"):
        await rt.run("clf", {"text": "x"})
    monkeypatch.setattr(runtime_module, "_run", run)
    assert isinstance((await rt.run("clf", {"text": "x"})).output, dict)


# ------------------------------------------------------------ batching


LM_REQUESTS = [
    {"prompt": "light", "max_new_tokens": 9, "temperature": 0.0},
    {"prompt": "the rays of light are refracted", "max_new_tokens": 5, "temperature": 0.9, "seed": 1},
    {"prompt": "x" * 80, "max_new_tokens": 12, "temperature": 1.3, "top_k": 5, "seed": 2},
    {"prompt": "colours", "max_new_tokens": 1, "temperature": 0.5, "seed": 3},
    {"prompt": "prism", "max_new_tokens": 7, "temperature": 0.0},
]


async def test_concurrent_requests_batch_and_match_unbatched(
    rt: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rt.load("lm", LM, make_model(tmp_path, "lm", LM))
    await rt.load("emb", EMB, make_model(tmp_path, "emb", EMB))
    alone_lm = [(await rt.run("lm", r)).output for r in LM_REQUESTS]
    texts = [["a"], ["light and colours", "the prism"], ["x" * 50]]
    alone_emb = [(await rt.run("emb", {"texts": t})).output for t in texts]
    before = rt.statistics().batches

    gate = Gate(monkeypatch)
    results: dict[Any, RunResult] = {}
    async with trio.open_nursery() as nursery:
        await collect(nursery, lambda: rt.run("lm", {"prompt": "first"}), results, "first")
        await gate.wait_entered(1)  # the first batch holds the device...
        for i, r in enumerate(LM_REQUESTS):
            await collect(nursery, lambda r=r: rt.run("lm", r), results, ("lm", i))  # type: ignore[misc]
        for i, t in enumerate(texts):
            await collect(nursery, lambda t=t: rt.run("emb", {"texts": t}), results, ("emb", i))  # type: ignore[misc]
        await trio.testing.wait_all_tasks_blocked()
        waiting = {m.model_id: m.queue_length + m.running for m in rt.statistics().models}
        assert waiting == {"lm": 1 + len(LM_REQUESTS), "emb": len(texts)}  # ...while the rest wait
        gate.allow(3)
    stats = rt.statistics()
    assert stats.batches - before == 3  # 1 + 9 requests in 3 forward batches, not 10
    assert sorted(len(b) for b in gate.batches) == [1, 3, 5]
    assert [results[("lm", i)].output for i in range(len(LM_REQUESTS))] == alone_lm
    assert results[("lm", 0)].usage.batch_size == len(LM_REQUESTS)
    for i, expected in enumerate(alone_emb):
        got = results[("emb", i)].output
        assert isinstance(got, list) and isinstance(expected, list)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-5)


async def test_max_batch_size_splits_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_size=2, max_batch_wait_s=0.0, torch_threads=1)
    async with open_runtime(cfg) as rt:
        await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
        gate = Gate(monkeypatch)
        results: dict[Any, RunResult] = {}
        async with trio.open_nursery() as nursery:
            await collect(nursery, lambda: rt.run("clf", {"text": "first"}), results, -1)
            await gate.wait_entered(1)
            for i in range(5):
                await collect(nursery, lambda i=i: rt.run("clf", {"text": f"t{i}"}), results, i)  # type: ignore[misc]
            await trio.testing.wait_all_tasks_blocked()
            gate.allow(4)
        assert [len(b) for b in gate.batches] == [1, 2, 2, 1]
        assert len(results) == 6


async def test_full_batches_waiting_for_a_busy_device_go_in_one_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_size=2, max_batch_wait_s=0.0, torch_threads=1)
    async with open_runtime(cfg) as rt:
        await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
        jobs: list[int] = []
        run_batches = runtime_module._run_batches

        def counted(spec: Any, module: Any, batches: list[Any], device: str) -> Any:
            jobs.append(len(batches))
            return run_batches(spec, module, batches, device)

        monkeypatch.setattr(runtime_module, "_run_batches", counted)
        gate = Gate(monkeypatch)
        results: dict[Any, RunResult] = {}
        async with trio.open_nursery() as nursery:
            await collect(nursery, lambda: rt.run("clf", {"text": "first"}), results, -1)
            await gate.wait_entered(1)
            for i in range(2 * runtime_module.BATCHES_PER_JOB + 1):
                await collect(nursery, lambda i=i: rt.run("clf", {"text": f"t{i}"}), results, i)  # type: ignore[misc]
            await trio.testing.wait_all_tasks_blocked()
            gate.allow(runtime_module.BATCHES_PER_JOB + 2)
        k = runtime_module.BATCHES_PER_JOB
        assert jobs == [1, k, 1]  # the waiting full batches in one job; the odd one alone behind it
        assert [len(b) for b in gate.batches] == [1] + [2] * k + [1]
        assert len(results) == 2 * k + 2


async def test_first_request_waits_for_company(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_size=8, max_batch_wait_s=1.0, torch_threads=1)
    async with open_runtime(cfg) as rt:
        await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
        results: dict[Any, RunResult] = {}
        async with trio.open_nursery() as nursery:
            for i in range(3):
                await collect(nursery, lambda i=i: rt.run("clf", {"text": f"t{i}"}), results, i)  # type: ignore[misc]
        assert rt.statistics().batches == 1
        assert {r.usage.batch_size for r in results.values()} == {3}


# ------------------------------------------------------------ cancellation


async def test_cancelled_queued_request_never_runs(
    rt: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    gate = Gate(monkeypatch)
    results: dict[Any, RunResult] = {}
    async with trio.open_nursery() as nursery:
        await collect(nursery, lambda: rt.run("clf", {"text": "kept"}), results, "kept")
        await gate.wait_entered(1)
        with trio.CancelScope() as scope:
            scope.cancel()
            await rt.run("clf", {"text": "withdrawn"})
        assert rt.statistics().queue_length == 0
        gate.allow(1)
    assert set(results) == {"kept"}
    assert len(gate.batches) == 1
    stats = rt.statistics()
    assert (stats.tasks_cancelled, stats.tasks_served, stats.batches) == (1, 1, 1)


async def test_cancelled_running_request_drops_its_result(
    rt: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    gate = Gate(monkeypatch)
    results: dict[Any, RunResult] = {}
    outcome: list[str] = []
    async with trio.open_nursery() as nursery:
        await collect(nursery, lambda: rt.run("clf", {"text": "first"}), results, "first")
        await gate.wait_entered(1)
        scope = trio.CancelScope()

        async def doomed() -> None:
            with scope:
                results["doomed"] = await rt.run("clf", {"text": "doomed"})
            outcome.append("cancelled" if scope.cancelled_caught else "returned")

        nursery.start_soon(doomed)
        await collect(nursery, lambda: rt.run("clf", {"text": "sibling"}), results, "sibling")
        await trio.testing.wait_all_tasks_blocked()
        gate.allow(1)
        await gate.wait_entered(2)  # "doomed" and "sibling" now run together
        assert rt.statistics().models[0].running == 2
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.allow(1)
    assert outcome == ["cancelled"]
    assert set(results) == {"first", "sibling"}
    assert [len(b) for b in gate.batches] == [1, 2]
    stats = rt.statistics()
    assert (stats.tasks_served, stats.tasks_cancelled) == (2, 1)


async def test_unload_fails_queued_requests(rt: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    gate = Gate(monkeypatch)
    results: dict[Any, Any] = {}

    async def capture(key: str) -> None:
        try:
            results[key] = await rt.run("clf", {"text": key})
        except ModelUnloaded as e:
            results[key] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture, "running")
        await gate.wait_entered(1)
        nursery.start_soon(capture, "queued")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(rt.unload, "clf")
        await trio.testing.wait_all_tasks_blocked()
        gate.allow(1)  # the running batch finishes and delivers; the queued one never runs
    assert isinstance(results["running"], RunResult)
    assert isinstance(results["queued"], ModelUnloaded)
    assert rt.loaded() == [] and rt.bytes_in_use() == 0
    with pytest.raises(ModelNotLoaded):
        await rt.run("clf", {"text": "x"})


# ------------------------------------------------------------ memory budget


async def test_model_over_the_budget_is_refused(tmp_path: Path) -> None:
    cfg = RuntimeConfig(device="cpu", memory_limit_bytes=need(LM, RuntimeConfig()) - 1)
    async with open_runtime(cfg) as rt:
        with pytest.raises(MemoryBudgetExceeded):
            await rt.load("lm", LM, make_model(tmp_path, "lm", LM))
        assert rt.loaded() == [] and rt.bytes_in_use() == 0


async def test_lru_idle_model_is_evicted(tmp_path: Path) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0)
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0, memory_limit_bytes=2 * need(CLF, cfg))
    folder = make_model(tmp_path, "clf", CLF)
    async with open_runtime(cfg) as rt:
        await rt.load("a", CLF, folder)
        await rt.load("b", CLF, folder)
        assert rt.bytes_in_use() == cfg.memory_limit_bytes
        await rt.run("a", {"text": "x"})  # "b" is now the least recently used
        await rt.load("c", CLF, folder)
        assert {m.model_id for m in rt.loaded()} == {"a", "c"}
        assert rt.statistics().evictions == 1
        with pytest.raises(ModelNotLoaded):
            await rt.run("b", {"text": "x"})


async def test_bad_weights_evict_nothing(tmp_path: Path) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0)
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0, memory_limit_bytes=need(CLF, cfg))
    async with open_runtime(cfg) as rt:
        await rt.load("a", CLF, make_model(tmp_path, "clf", CLF))
        with pytest.raises(InvalidWeights):
            await rt.load("b", CLF, make_model(tmp_path, "lm", LM))
        assert [m.model_id for m in rt.loaded()] == ["a"] and rt.statistics().evictions == 0


async def test_busy_model_is_never_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0)
    cfg = RuntimeConfig(device="cpu", max_batch_wait_s=0.0, memory_limit_bytes=need(CLF, cfg))
    folder = make_model(tmp_path, "clf", CLF)
    async with open_runtime(cfg) as rt:
        await rt.load("a", CLF, folder)
        gate = Gate(monkeypatch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.run, "a", {"text": "x"})
            await gate.wait_entered(1)
            with pytest.raises(MemoryBudgetExceeded):
                await rt.load("b", CLF, folder)
            gate.allow(1)
        await rt.load("b", CLF, folder)  # "a" is idle again: evicted
        assert [m.model_id for m in rt.loaded()] == ["b"]


# ------------------------------------------------------------ lifecycle and status


async def test_runtime_closed_outside_serve(tmp_path: Path) -> None:
    runtime = ModelRuntime(RuntimeConfig.for_tests())
    with pytest.raises(RuntimeClosed):
        await runtime.load("clf", CLF, tmp_path)
    async with open_runtime(RuntimeConfig.for_tests()) as rt:
        await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    with pytest.raises(RuntimeClosed):
        await rt.run("clf", {"text": "x"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
async def test_forcing_cuda_without_one(tmp_path: Path) -> None:
    async with open_runtime(RuntimeConfig(device="cuda")) as rt:
        with pytest.raises(DeviceUnavailable):
            await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
        assert rt.bytes_in_use() == 0


async def test_statistics(rt: ModelRuntime, tmp_path: Path) -> None:
    await rt.load("clf", CLF, make_model(tmp_path, "clf", CLF))
    await rt.run("clf", {"text": "x"})
    stats = rt.statistics()
    assert stats.device == "cpu"
    assert stats.bytes_in_use == need(CLF, rt.config) > 0
    assert (stats.tasks_served, stats.batches, stats.queue_length) == (1, 1, 0)
    d = stats.to_dict()
    assert d["models"][0]["model_id"] == "clf" and d["models"][0]["served"] == 1


def test_importing_agents_does_not_import_torch() -> None:
    code = (
        "import sys, prsm_node.agents as a\n"
        "r = a.ModelRuntime(a.RuntimeConfig())\n"
        "r.statistics(); a.parse_spec({'name': 'mlp-classifier', 'config': "
        "{'labels': ['x', 'y'], 'input': 'vector', 'input_dim': 2}})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_texts_encode_as_bytes_exactly_as_id_lists() -> None:
    """The embedder's byte path gives what encode_chars + pad_batch give, and the list way
    takes any batch it cannot take (a character above Latin-1, a vocabulary over 254)."""
    from prsm_node.agents.architectures import encode_texts, pad_batch
    from prsm_node.agents.text import encode_chars

    vocab = "\n abcdefghijklmnopqrstuvwxyzABC.,;:é"
    cases = [["abc", "", "Hello, world.", "ÿé\x00z"], ["x"], ["", ""], ["naïve", "∑ not latin-1", "abc"]]
    big = "".join(chr(0x100 + i) for i in range(300))
    for vocab_, texts in [*((vocab, c) for c in cases), (big, ["abc", big[:40]])]:
        ids, valid, lengths = encode_texts(vocab_, texts)
        rows = [encode_chars(vocab_, t) for t in texts]
        want_ids, want_valid = pad_batch(rows, left=False, device=torch.device("cpu"))
        assert ids.dtype == want_ids.dtype and torch.equal(ids, want_ids)
        assert torch.equal(valid, want_valid)
        assert lengths == [len(r) for r in rows]
