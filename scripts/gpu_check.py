"""Compare a model's outputs on the CPU and on CUDA, within a tolerance.

    python scripts/gpu_check.py MODELS... [--second-device cuda] [--tolerance 1e-3]

MODELS are folders written by scripts/train_models.py (``spec.json`` + ``model.safetensors``),
or a folder of such folders. Each model is loaded on the CPU and on the second device with the
runtime's strict loader, the same fixed inputs are run on both, and the maximum absolute
difference is printed (LM: next-token logits, plus whether greedy generations agree; embedder:
vectors; classifier: probabilities). Exits 0 when every difference is within the tolerance,
1 otherwise, and 0 with a "no CUDA device" line when there is no CUDA device to compare with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prsm_node.agents.architectures import pad_batch, run_batch  # noqa: E402
from prsm_node.agents.inputs import ClassifyInput, EmbedInput, GenerateInput  # noqa: E402
from prsm_node.agents.specs import ClassifierConfig, EmbedderConfig, LMConfig, ModelSpec, parse_spec  # noqa: E402
from prsm_node.agents.text import encode_chars  # noqa: E402
from prsm_node.agents.weights import load_module  # noqa: E402

TEXTS = [
    "The Rays of Light",
    "If the Prism be turned about its Axis",
    "Do not Bodies act upon Light at a distance, and by their action bend its Rays?",
    "The Colours of thin transparent Plates",
]


def model_dirs(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        if (p / "spec.json").is_file():
            found.append(p)
        else:
            found.extend(sorted(d for d in p.iterdir() if (d / "spec.json").is_file()))
    return found


def outputs(spec: ModelSpec, folder: Path, device: str) -> tuple[torch.Tensor, Any]:
    """A float tensor to compare numerically, and an exact-match output (or None)."""
    module = load_module(spec, folder, device)
    dev = torch.device(device)
    cfg = spec.config
    with torch.inference_mode():
        if isinstance(cfg, LMConfig):
            rows = [encode_chars(cfg.shape.vocab, t)[-cfg.shape.context :] for t in TEXTS]
            ids, valid = pad_batch(rows, left=True, device=dev)
            logits = module(ids, valid)[:, -1].float().cpu()
            greedy = [run_batch(spec, module, [GenerateInput(t, 40, 0.0, 0, 0)], dev)[0][0] for t in TEXTS]
            return logits, greedy
        if isinstance(cfg, EmbedderConfig):
            vectors = run_batch(spec, module, [EmbedInput(tuple(TEXTS))], dev)[0][0]
            return torch.tensor(vectors), None
        assert isinstance(cfg, ClassifierConfig)
        if cfg.input == "text":
            reqs = [ClassifyInput(text=t) for t in TEXTS]
        else:
            g = torch.Generator().manual_seed(0)
            reqs = [ClassifyInput(vector=tuple(torch.randn(cfg.input_dim, generator=g).tolist())) for _ in TEXTS]
        probs = [list(p[0].values()) for p in run_batch(spec, module, reqs, dev)]  # type: ignore[union-attr]
        return torch.tensor(probs), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--second-device", default="cuda", help="compared with cpu (cpu here self-tests the script)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)
    second = args.second_device
    if second.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device: nothing to compare (torch {torch.__version__}, CPU only)")
        return 0
    name = torch.cuda.get_device_name(torch.device(second)) if second.startswith("cuda") else "cpu"
    print(f"devices: cpu vs {second} ({name}); torch {torch.__version__}; tolerance {args.tolerance}")
    folders = model_dirs(args.models)
    if not folders:
        print("no model folders (spec.json + model.safetensors) found")
        return 1
    ok = True
    for folder in folders:
        spec = parse_spec(json.loads((folder / "spec.json").read_text(encoding="utf-8"))["architecture"])
        a, exact_a = outputs(spec, folder, "cpu")
        b, exact_b = outputs(spec, folder, second)
        diff = float((a - b).abs().max())
        line = f"{folder.name:24s} {spec.family:26s} max |cpu - {second}| = {diff:.3e}"
        if exact_a is not None:
            same = sum(x == y for x, y in zip(exact_a, exact_b, strict=True))
            line += f"; greedy generations identical {same}/{len(exact_a)}"
        passed = diff <= args.tolerance
        ok = ok and passed
        print(f"{line}  {'ok' if passed else 'OVER TOLERANCE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
