"""The training script (tiny mode) writes models the runtime loads; gpu_check compares devices."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from prsm_node.agents import RuntimeConfig, open_runtime, parse_spec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("opticks-lm", "opticks-embedder", "opticks-classifier")


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    assert script("train_models").main([str(out), "--tiny"]) == 0
    return out


def test_corpus_is_the_committed_public_domain_text() -> None:
    corpus = ROOT / "data" / "corpus"
    text = (corpus / "newton_opticks.txt").read_text(encoding="utf-8")
    assert text.count("THE FIRST BOOK OF OPTICKS") == 2 and "_Query_ 1." in text
    assert (corpus / "newton_opticks.txt").stat().st_size < 1 << 20
    assert "Project Gutenberg" in (corpus / "README.md").read_text(encoding="utf-8")


def test_tiny_training_writes_loadable_models(trained: Path) -> None:
    for name in MODELS:
        doc = json.loads((trained / name / "spec.json").read_text(encoding="utf-8"))
        spec = parse_spec(doc["architecture"])
        assert doc["tags"] and doc["training"]["seed"] == 0
        assert spec.to_dict() == doc["architecture"]
    metrics = json.loads((trained / "opticks-classifier" / "spec.json").read_text())["training"]
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0


def test_training_is_reproducible(trained: Path, tmp_path: Path) -> None:
    assert script("train_models").main([str(tmp_path), "--tiny"]) == 0
    for name in MODELS:
        a = (trained / name / "model.safetensors").read_bytes()
        assert a == (tmp_path / name / "model.safetensors").read_bytes(), name


async def test_trained_models_run_in_the_runtime(trained: Path) -> None:
    async with open_runtime(RuntimeConfig.for_tests()) as rt:
        for name in MODELS:
            doc = json.loads((trained / name / "spec.json").read_text(encoding="utf-8"))
            await rt.load(name, doc["architecture"], trained / name)
        text = await rt.run("opticks-lm", {"prompt": "The Rays of Light", "max_new_tokens": 20, "seed": 1})
        assert isinstance(text.output, str) and len(text.output) == 20
        vectors = await rt.run("opticks-embedder", {"texts": ["a Prism", "thin Plates of Air"]})
        assert isinstance(vectors.output, list) and len(vectors.output) == 2
        probs = await rt.run("opticks-classifier", {"text": "The Rings of Colours made by thin Plates"})
        assert isinstance(probs.output, dict) and set(probs.output) == {"book-i", "book-ii", "book-iii"}


def test_gpu_check_compares_devices(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = script("gpu_check")
    assert gpu_check.main([str(trained), "--second-device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("max |cpu - cpu| = 0.000e+00") == 3 and "greedy generations identical 4/4" in out
    if not torch.cuda.is_available():
        assert gpu_check.main([str(trained)]) == 0
        assert "no CUDA device" in capsys.readouterr().out
