"""The built-in model families: torch modules built from validated specs, and their batch runners.

A published model is data: a spec (``specs.py``) plus safetensors weights. Only the families
registered in ``FAMILIES`` can be built, so no code ever comes from the network. This module
imports torch at the top; the runtime imports it only when a model is loaded.

Batches are padded so that every row computes what it would compute alone: the language model
pads on the left (the next token is always read in the last column), the embedder on the right
with masked mean pooling; padded keys are masked out of attention, and every query may attend
to itself so that padding rows stay finite instead of NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .inputs import ClassifyInput, EmbedInput, GenerateInput, ModelInput, Output
from .specs import (
    CLASSIFIER_FAMILY,
    EMBEDDER_FAMILY,
    FAMILY_TAGS,
    LM_FAMILY,
    N_SPECIAL,
    PAD_ID,
    ClassifierConfig,
    EmbedderConfig,
    FamilyConfig,
    LMConfig,
    ModelSpec,
    TransformerShape,
)
from .text import decode_chars, encode_bytes, encode_chars, ngram_features

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------ the transformer trunk


class Block(nn.Module):
    """Pre-LayerNorm transformer block: multi-head self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return out


class Trunk(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, a final LayerNorm."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok = nn.Embedding(shape.n_tokens, shape.d_model)
        self.pos = nn.Embedding(shape.context, shape.d_model) if shape.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(shape.d_model, shape.n_heads, shape.d_ff) for _ in range(shape.n_layers))
        self.ln_f = nn.LayerNorm(shape.d_model)

    def _positions(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.pos is not None:
            learned: torch.Tensor = self.pos(positions)
            return learned
        half = self.shape.d_model // 2
        freq = torch.exp(torch.arange(half, device=positions.device) * (-math.log(10000.0) / half))
        angles = positions[..., None].float() * freq
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """``ids`` and ``valid`` are (batch, time); positions count valid tokens only, so a
        left-padded row sees the same positions as it would unpadded."""
        t = ids.shape[1]
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        x = self.tok(ids)
        x = x + self._positions(positions, x.dtype)
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        mask = mask | torch.eye(t, dtype=torch.bool, device=ids.device)
        for block in self.blocks:
            x = block(x, mask)
        out: torch.Tensor = self.ln_f(x)
        return out


class CharLM(nn.Module):
    """Decoder-only character language model: logits over the next token at every position."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg.shape)
        self.head = nn.Linear(cfg.shape.d_model, cfg.shape.n_tokens)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.trunk(ids, valid, causal=True))
        return logits


class CharEmbedder(nn.Module):
    """Bidirectional character encoder: masked mean pooling, projection, L2 normalisation."""

    def __init__(self, cfg: EmbedderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg.shape)
        self.proj = nn.Linear(cfg.shape.d_model, cfg.dim)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.trunk(ids, valid, causal=False)
        weights = valid.to(h.dtype)[..., None]
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(self.proj(pooled).float(), dim=-1)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}


class MLPClassifier(nn.Module):
    """Linear layers with an activation between them; returns logits over the labels."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(w, w[1:], strict=False))
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = _ACTIVATIONS[self.activation](layer(x))
        out: torch.Tensor = self.layers[-1](x)
        return out


# ------------------------------------------------------------ padding and features


def pad_batch(rows: Sequence[Sequence[int]], *, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one (batch, time) tensor and its validity mask. Built as Python lists and
    converted once: a tensor per row costs more than the forward pass of a small model."""
    width = max(1, max(len(r) for r in rows))
    padded = []
    for row in rows:
        fill = [PAD_ID] * (width - len(row))
        padded.append([*fill, *row] if left else [*row, *fill])
    ids = torch.tensor(padded, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)[:, None]
    cols = torch.arange(width)[None, :]
    valid = cols >= width - lengths if left else cols < lengths
    return ids.to(device), valid.to(device)


def classifier_features(cfg: ClassifierConfig, inputs: Sequence[ClassifyInput]) -> tuple[torch.Tensor, list[int]]:
    """The dense input matrix of a classifier batch, and each row's count of non-zero features."""
    x = torch.zeros((len(inputs), cfg.input_dim), dtype=torch.float32)
    counts = []
    rows: list[int] = []  # one scatter for the whole batch: a tensor op per row costs more
    cols: list[int] = []
    values: list[float] = []
    for i, item in enumerate(inputs):
        if item.vector is not None:
            rows += [i] * len(item.vector)
            cols += range(len(item.vector))
            values += item.vector
            counts.append(len(item.vector))
        else:
            feats = ngram_features(item.text or "", cfg.input_dim, cfg.ngram_min, cfg.ngram_max)
            rows += [i] * len(feats)
            cols += feats.keys()
            values += feats.values()
            counts.append(len(feats))
    if rows:
        x[rows, cols] = torch.tensor(values, dtype=torch.float32)
    return x, counts


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits (on CPU, float32): greedy at temperature 0,
    else softmax(logits / temperature) over the ``top_k`` best (all when 0), drawn with the
    request's own seeded generator so that batching never changes a request's sample."""
    logits = logits.clone()
    logits[:N_SPECIAL] = -math.inf  # never generate padding or "unknown"
    if temperature == 0.0:
        return int(torch.argmax(logits).item())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


# ------------------------------------------------------------ batch runners
#
# A batch runs in two halves: ``prepare`` turns validated inputs into CPU tensors (pure Python
# work: encoding, padding, features) and ``execute`` runs the module and decodes its outputs.
# The runtime prepares the next batch while the device executes the current one.

BatchResult = list[tuple[Output, int, int]]  # (output, tokens_in, tokens_out) per request


@dataclass(frozen=True)
class Prepared:
    """A batch ready for the device: its requests and the tensors (and counts) they became."""

    inputs: tuple[ModelInput, ...]
    tensors: tuple[torch.Tensor, ...] = ()
    counts: tuple[int, ...] = ()  # per request (classifier: non-zero features; embedder: texts)
    tokens: tuple[int, ...] = ()  # per request: tokens in


def _prepare_lm(cfg: FamilyConfig, inputs: Sequence[ModelInput]) -> Prepared:
    return Prepared(tuple(r for r in inputs if isinstance(r, GenerateInput)))


def _execute_lm(module: nn.Module, cfg: FamilyConfig, prepared: Prepared, device: torch.device) -> BatchResult:
    assert isinstance(cfg, LMConfig)
    reqs = [r for r in prepared.inputs if isinstance(r, GenerateInput)]
    vocab, context = cfg.shape.vocab, cfg.shape.context
    seqs = [encode_chars(vocab, r.prompt)[-context:] for r in reqs]
    prompt_lens = [len(s) for s in seqs]
    generators = [torch.Generator().manual_seed(r.seed) for r in reqs]
    for step in range(max(r.max_new_tokens for r in reqs)):
        active = [i for i, r in enumerate(reqs) if step < r.max_new_tokens]
        ids, valid = pad_batch([seqs[i][-context:] for i in active], left=True, device=device)
        logits = module(ids, valid)[:, -1].float().cpu()
        for row, i in enumerate(active):
            r = reqs[i]
            seqs[i].append(sample_next(logits[row], r.temperature, r.top_k, generators[i]))
    return [
        (decode_chars(vocab, seqs[i][prompt_lens[i] :]), prompt_lens[i], r.max_new_tokens) for i, r in enumerate(reqs)
    ]


def encode_texts(vocab: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded (batch, time) ids of ``texts``, their validity mask and each row's length:
    what ``pad_batch`` gives for ``encode_chars`` rows. Texts of Latin-1 characters (with a
    vocabulary of at most 254) are encoded and padded as bytes and become one tensor without a
    Python int per character; any other batch goes the list way."""
    encoded = [encode_bytes(vocab, t) for t in texts]
    rows = [r for r in encoded if r is not None]
    if len(rows) < len(texts):
        lists = [encode_chars(vocab, t) for t in texts]
        ids, valid = pad_batch(lists, left=False, device=torch.device("cpu"))
        return ids, valid, [len(r) for r in lists]
    lengths = [len(r) for r in rows]
    width = max(1, max(lengths))
    pad = bytes([PAD_ID])
    buf = bytearray(b"".join(r.ljust(width, pad) for r in rows))
    ids = torch.frombuffer(buf, dtype=torch.uint8).view(len(rows), width).long()
    valid = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
    return ids, valid, lengths


def _prepare_embedder(cfg: FamilyConfig, inputs: Sequence[ModelInput]) -> Prepared:
    assert isinstance(cfg, EmbedderConfig)
    reqs = tuple(r for r in inputs if isinstance(r, EmbedInput))
    context = cfg.shape.context
    ids, valid, lengths = encode_texts(cfg.shape.vocab, [t[:context] for r in reqs for t in r.texts])
    counts, tokens, start = [], [], 0
    for r in reqs:
        n = len(r.texts)
        counts.append(n)
        tokens.append(sum(lengths[start : start + n]))
        start += n
    return Prepared(reqs, (ids, valid), tuple(counts), tuple(tokens))


def _execute_embedder(module: nn.Module, cfg: FamilyConfig, prepared: Prepared, device: torch.device) -> BatchResult:
    assert isinstance(cfg, EmbedderConfig)
    ids, valid = (t.to(device) for t in prepared.tensors)
    vectors = module(ids, valid).cpu().tolist()
    out: BatchResult = []
    start = 0
    for n, tokens in zip(prepared.counts, prepared.tokens, strict=True):
        out.append((vectors[start : start + n], tokens, n * cfg.dim))
        start += n
    return out


def _prepare_classifier(cfg: FamilyConfig, inputs: Sequence[ModelInput]) -> Prepared:
    assert isinstance(cfg, ClassifierConfig)
    reqs = tuple(r for r in inputs if isinstance(r, ClassifyInput))
    x, counts = classifier_features(cfg, reqs)
    return Prepared(reqs, (x.to(dtype=TORCH_DTYPES[cfg.dtype]),), tuple(counts))


def _execute_classifier(module: nn.Module, cfg: FamilyConfig, prepared: Prepared, device: torch.device) -> BatchResult:
    assert isinstance(cfg, ClassifierConfig)
    probs = torch.softmax(module(prepared.tensors[0].to(device)).float(), dim=-1).cpu().tolist()
    return [(dict(zip(cfg.labels, p, strict=True)), prepared.counts[i], 0) for i, p in enumerate(probs)]


# ------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Family:
    """One built-in model family: how to build its module and how to run a batch on it."""

    name: str
    tags: tuple[str, ...]
    build: Callable[[FamilyConfig], nn.Module]
    prepare: Callable[[FamilyConfig, Sequence[ModelInput]], Prepared]
    execute: Callable[[nn.Module, FamilyConfig, Prepared, torch.device], BatchResult]


def _builder(cls: type[nn.Module], config_type: type) -> Callable[[FamilyConfig], nn.Module]:
    def build(cfg: FamilyConfig) -> nn.Module:
        assert isinstance(cfg, config_type)
        return cls(cfg)

    return build


FAMILIES: dict[str, Family] = {
    LM_FAMILY: Family(LM_FAMILY, FAMILY_TAGS[LM_FAMILY], _builder(CharLM, LMConfig), _prepare_lm, _execute_lm),
    EMBEDDER_FAMILY: Family(EMBEDDER_FAMILY, FAMILY_TAGS[EMBEDDER_FAMILY], _builder(CharEmbedder, EmbedderConfig),
                            _prepare_embedder, _execute_embedder),
    CLASSIFIER_FAMILY: Family(CLASSIFIER_FAMILY, FAMILY_TAGS[CLASSIFIER_FAMILY],
                              _builder(MLPClassifier, ClassifierConfig), _prepare_classifier, _execute_classifier),
}


def build_module(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The family's module for ``spec``, with freshly initialised weights in the spec's dtype.
    On ``device="meta"`` nothing is allocated: that is how expected tensor shapes are read."""
    with torch.device(device):
        module = FAMILIES[spec.family].build(spec.config)
    return module.to(TORCH_DTYPES[spec.config.dtype])


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor a weights file for ``spec`` must hold, no more."""
    module = build_module(spec, "meta")
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}


def prepare_batch(spec: ModelSpec, inputs: Sequence[ModelInput]) -> Prepared:
    """The CPU tensors of a batch of validated inputs (blocking: call it from a worker thread)."""
    with torch.inference_mode():
        return FAMILIES[spec.family].prepare(spec.config, inputs)


def execute_batch(spec: ModelSpec, module: nn.Module, prepared: Prepared, device: torch.device) -> BatchResult:
    """Run a prepared batch on ``device`` (blocking: call it from a worker thread)."""
    with torch.inference_mode():
        return FAMILIES[spec.family].execute(module, spec.config, prepared, device)


def run_batch(spec: ModelSpec, module: nn.Module, inputs: Sequence[ModelInput], device: torch.device) -> BatchResult:
    """Run one batch of validated inputs (blocking: call it from a worker thread)."""
    return execute_batch(spec, module, prepare_batch(spec, inputs), device)
