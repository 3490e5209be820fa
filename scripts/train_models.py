"""Train the three demo models on Newton's *Opticks* (data/corpus/) on the CPU, in about a minute.

    python scripts/train_models.py OUT_DIR [--tiny] [--only lm,embedder,classifier] [--seed 0]

writes, for each model, ``OUT_DIR/<name>/model.safetensors`` and ``OUT_DIR/<name>/spec.json``
(``{"architecture": <spec>, "tags": [...], "training": {...}}``; the architecture is what a model
manifest stores, and what ``ModelRuntime.load`` takes):

- ``opticks-lm``: a character-level transformer language model over the whole book (next
  character prediction); reports held-out bits per character and a few generated samples.
- ``opticks-embedder``: a character transformer encoder trained contrastively (InfoNCE with
  in-batch negatives): two overlapping windows of one paragraph (the second shifted by half a
  window) should embed close together, windows of other paragraphs apart. Reports top-1
  retrieval accuracy on held-out paragraphs (find the shifted window of the same paragraph
  among those of all held-out paragraphs), trained vs untrained.
- ``opticks-classifier``: an MLP over hashed character n-grams that tells which of the three
  Books of the *Opticks* a sentence comes from. Reports held-out accuracy (every fifth
  paragraph is held out, so no sentence of a test paragraph is seen in training) against the
  majority-class baseline.

Everything is seeded and runs on one CPU thread, so two runs write identical files. ``--tiny``
trains a few steps of tiny models on part of the corpus (for tests: a few seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812

from prsm_node.agents.architectures import CharEmbedder, CharLM, MLPClassifier, build_module, pad_batch  # noqa: E402
from prsm_node.agents.inputs import GenerateInput  # noqa: E402
from prsm_node.agents.specs import FAMILY_TAGS, ModelSpec, parse_spec  # noqa: E402
from prsm_node.agents.text import encode_chars, ngram_features  # noqa: E402
from prsm_node.agents.weights import save_module  # noqa: E402

CORPUS = ROOT / "data" / "corpus" / "newton_opticks.txt"
BOOKS = ("book-i", "book-ii", "book-iii")
BOOK_MARKERS = ("THE FIRST BOOK OF OPTICKS", "\nSECOND BOOK\n", "\nTHIRD BOOK\n")
LM_PROMPTS = ("The Rays of Light", "If the Prism be turned", "Do not Bodies act upon Light")


# ------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Paragraph:
    book: int  # 0, 1, 2 for Books I, II, III
    text: str


def load_paragraphs(path: Path) -> list[Paragraph]:
    """The body of the book as clean paragraphs: italics marks removed, lines joined, and
    headings, illustrations and ASCII tables dropped."""
    raw = path.read_text(encoding="utf-8")
    starts = [raw.index(m) for m in BOOK_MARKERS] + [len(raw)]
    out = []
    for book in range(3):
        for block in re.split(r"\n\s*\n", raw[starts[book] : starts[book + 1]]):
            text = " ".join(block.replace("_", "").split())
            if len(text) < 80 or "|" in text or text.startswith("[Illustration") or "---" in text:
                continue
            if sum(c.isalpha() for c in text) < 0.7 * len(text):
                continue
            out.append(Paragraph(book, text))
    return out


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.;?!])\s+(?=[A-Z])", text)
    return [p for p in parts if 30 <= len(p) <= 400]


def vocabulary(text: str, min_count: int) -> str:
    counts = Counter(text)
    return "".join(sorted(c for c, n in counts.items() if n >= min_count))


def write_model(out: Path, name: str, spec: ModelSpec, module: torch.nn.Module, training: dict[str, Any]) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_module(module, folder / "model.safetensors")
    doc = {"architecture": spec.to_dict(), "tags": list(FAMILY_TAGS[spec.family]), "training": training}
    (folder / "spec.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------ language model


def train_lm(paras: list[Paragraph], out: Path, seed: int, tiny: bool) -> dict[str, Any]:
    text = "\n".join(p.text for p in paras)
    split = int(len(text) * 0.95)
    train_text, val_text = text[:split], text[split:]
    vocab = vocabulary(text, 5)
    if tiny:
        config = {"vocab": vocab, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "context": 32}
        steps, batch, lr = 30, 16, 3e-3
    else:
        config = {"vocab": vocab, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256, "context": 64}
        steps, batch, lr = 800, 32, 1e-2
    spec = parse_spec({"name": "char-transformer-lm", "config": {**config, "positions": "learned"}})
    context = spec.config.shape.context  # type: ignore[union-attr]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_module(spec)
    assert isinstance(model, CharLM)
    data = torch.tensor(encode_chars(vocab, train_text), dtype=torch.long)
    val = torch.tensor(encode_chars(vocab, val_text), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        offsets = [rng.randrange(len(data) - context - 1) for _ in range(batch)]
        x = torch.stack([data[o : o + context] for o in offsets])
        y = torch.stack([data[o + 1 : o + context + 1] for o in offsets])
        logits = model(x, torch.ones_like(x, dtype=torch.bool))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        n = min(len(val) - 1, context * (8 if tiny else 64))
        usable = (n // context) * context
        x = val[:usable].view(-1, context)
        y = val[1 : usable + 1].view(-1, context)
        val_loss = F.cross_entropy(model(x, torch.ones_like(x, dtype=torch.bool)).flatten(0, 1), y.flatten()).item()
    from prsm_node.agents.architectures import run_batch

    samples = {}
    for i, prompt in enumerate(LM_PROMPTS):
        for temperature in (0.0, 0.8):
            req = GenerateInput(prompt, 160 if not tiny else 16, temperature, 20 if temperature else 0, seed + i)
            (text_out, _, _), *_ = run_batch(spec, model, [req], torch.device("cpu"))
            samples[f"{prompt} | T={temperature}"] = text_out
    training = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "seconds": round(seconds, 1),
        "train_chars": len(train_text),
        "val_bits_per_char": round(val_loss / 0.6931471805599453, 3),
        "params": spec.param_count(),
        "samples": samples,
    }
    write_model(out, "opticks-lm", spec, model, training)
    return training


# ------------------------------------------------------------ embedder


def span_pairs(paras: list[Paragraph], length: int, rng: random.Random) -> list[tuple[str, str]]:
    """Per paragraph, two windows of ``length`` characters at a random place, the second
    shifted by half a window: two views of one passage that share half their text."""
    pairs = []
    shift = length // 2
    for p in paras:
        start = rng.randrange(max(1, len(p.text) - length - shift + 1))
        pairs.append((p.text[start : start + length], p.text[start + shift : start + shift + length]))
    return pairs


def embed(model: CharEmbedder, vocab: str, texts: list[str]) -> torch.Tensor:
    ids, valid = pad_batch([encode_chars(vocab, t) for t in texts], left=False, device=torch.device("cpu"))
    out: torch.Tensor = model(ids, valid)
    return out


def retrieval_at_1(model: CharEmbedder, vocab: str, pairs: list[tuple[str, str]]) -> float:
    with torch.inference_mode():
        a = embed(model, vocab, [p[0] for p in pairs])
        b = embed(model, vocab, [p[1] for p in pairs])
        hits = (a @ b.T).argmax(dim=1) == torch.arange(len(pairs))
    return float(hits.float().mean().item())


def train_embedder(paras: list[Paragraph], out: Path, seed: int, tiny: bool) -> dict[str, Any]:
    text = "\n".join(p.text for p in paras)
    vocab = vocabulary(text, 5)
    if tiny:
        config = {"vocab": vocab, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "context": 48, "dim": 16}
        steps, batch, lr = 10, 16, 3e-3
    else:
        config = {"vocab": vocab, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128, "context": 96, "dim": 64}
        steps, batch, lr = 80, 48, 2e-3
    spec = parse_spec({"name": "char-transformer-embedder", "config": {**config, "positions": "sinusoidal"}})
    context = spec.config.shape.context  # type: ignore[union-attr]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_module(spec)
    assert isinstance(model, CharEmbedder)
    usable = [p for p in paras if len(p.text) >= context + context // 2]
    test = [p for i, p in enumerate(usable) if i % 5 == 0][:200]
    train = [p for i, p in enumerate(usable) if i % 5 != 0]
    test_pairs = span_pairs(test, context, random.Random(seed + 1))
    untrained = retrieval_at_1(model, vocab, test_pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        pairs = span_pairs(rng.sample(train, batch), context, rng)
        a = embed(model, vocab, [p[0] for p in pairs])
        b = embed(model, vocab, [p[1] for p in pairs])
        logits = a @ b.T / 0.05
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    training = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "seconds": round(seconds, 1),
        "objective": "InfoNCE (temperature 0.05, in-batch negatives): two half-overlapping windows of one "
        "paragraph embed close",
        "heldout_paragraphs": len(test_pairs),
        "heldout_retrieval_at_1": round(retrieval_at_1(model, vocab, test_pairs), 3),
        "untrained_retrieval_at_1": round(untrained, 3),
        "chance": round(1 / len(test_pairs), 4),
        "params": spec.param_count(),
    }
    write_model(out, "opticks-embedder", spec, model, training)
    return training


# ------------------------------------------------------------ classifier


def features(texts: list[str], dim: int, lo: int, hi: int) -> torch.Tensor:
    x = torch.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        f = ngram_features(t, dim, lo, hi)
        x[i, list(f)] = torch.tensor(list(f.values()))
    return x


def train_classifier(paras: list[Paragraph], out: Path, seed: int, tiny: bool) -> dict[str, Any]:
    rows = [(s, p.book, i % 5 == 0) for i, p in enumerate(paras) for s in sentences(p.text)]
    if tiny:
        rows = rows[::10]
    dim, hidden, epochs = (512, [16], 3) if tiny else (4096, [64], 12)
    spec = parse_spec(
        {
            "name": "mlp-classifier",
            "config": {
                "labels": list(BOOKS),
                "input": "text",
                "input_dim": dim,
                "hidden": hidden,
                "ngram_min": 2,
                "ngram_max": 4,
            },
        }
    )
    torch.manual_seed(seed)
    model = build_module(spec)
    assert isinstance(model, MLPClassifier)
    start = time.perf_counter()
    x = features([r[0] for r in rows], dim, 2, 4)
    y = torch.tensor([r[1] for r in rows])
    is_test = torch.tensor([r[2] for r in rows])
    x_train, y_train, x_test, y_test = x[~is_test], y[~is_test], x[is_test], y[is_test]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=gen).split(64):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        pred = model(x_test).argmax(dim=1)
    counts = Counter(y_test.tolist())
    training = {
        "seed": seed,
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "task": "which Book of the Opticks a sentence comes from (I: refraction and colours, "
        "II: colours of thin plates, III: inflexions and the Queries)",
        "train_sentences": int((~is_test).sum()),
        "test_sentences": int(is_test.sum()),
        "heldout_accuracy": round(float((pred == y_test).float().mean()), 3),
        "majority_baseline": round(max(counts.values()) / len(y_test), 3),
        "per_label_accuracy": {
            BOOKS[k]: round(float((pred[y_test == k] == k).float().mean()), 3) for k in sorted(counts)
        },
        "params": spec.param_count(),
    }
    write_model(out, "opticks-classifier", spec, model, training)
    return training


# ------------------------------------------------------------ main

TRAINERS = {"lm": train_lm, "embedder": train_embedder, "classifier": train_classifier}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder; one sub-folder per model")
    parser.add_argument("--tiny", action="store_true", help="a few steps of tiny models (tests)")
    parser.add_argument("--only", default="lm,embedder,classifier", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, polite)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(wanted) - set(TRAINERS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {list(TRAINERS)}")
    torch.set_num_threads(args.threads)
    raw = args.corpus.read_bytes()
    paras = load_paragraphs(args.corpus)
    if args.tiny:
        paras = paras[::8]
    print(
        f"corpus {args.corpus.name}: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:16]}…, "
        f"{len(paras)} paragraphs"
    )
    total = time.perf_counter()
    for name in wanted:
        result = TRAINERS[name](paras, args.out, args.seed, args.tiny)
        print(f"\n== {name} ==")
        print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"\ntrained {', '.join(wanted)} in {time.perf_counter() - total:.1f} s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
