"""Text to numbers, in pure Python, shared by the runtime and the training script.

Both must turn a text into exactly the same ids and features, or a model trained here would
answer differently on another node; so the hashing is ``zlib.crc32`` (fixed, unsalted), never
Python's ``hash()``.
"""

from __future__ import annotations

import functools
import math
import zlib

from .specs import N_SPECIAL, UNK_ID


def encode_chars(vocab: str, text: str) -> list[int]:
    """Character ids: ``vocab[i]`` is ``i + 2``; any other character is ``UNK_ID``."""
    index = _index(vocab)
    return [index.get(c, UNK_ID) for c in text]


@functools.lru_cache(maxsize=64)
def _index(vocab: str) -> dict[str, int]:
    return {c: i + N_SPECIAL for i, c in enumerate(vocab)}


def encode_bytes(vocab: str, text: str) -> bytes | None:
    """``encode_chars`` as one byte per id, in C (``bytes.translate``) rather than a dict lookup
    per character, when every id fits a byte: a vocabulary of at most 254 characters and a
    Latin-1 text. None otherwise (use ``encode_chars``)."""
    table = _byte_table(vocab)
    if table is None:
        return None
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return raw.translate(table)


@functools.lru_cache(maxsize=64)
def _byte_table(vocab: str) -> bytes | None:
    if len(vocab) + N_SPECIAL > 256:
        return None
    index = _index(vocab)
    return bytes(index.get(chr(b), UNK_ID) for b in range(256))


def decode_chars(vocab: str, ids: list[int]) -> str:
    """The inverse of encode_chars; padding and unknown ids decode to nothing."""
    return "".join(vocab[i - N_SPECIAL] for i in ids if N_SPECIAL <= i < len(vocab) + N_SPECIAL)


def ngram_features(text: str, dim: int, ngram_min: int, ngram_max: int) -> dict[int, float]:
    """Hashed character n-gram features of a lower-cased text padded with one space each side:
    bucket ``crc32(ngram) % dim`` counts each n-gram, then ``log1p`` and L2 normalisation.
    Returns the non-zero buckets only."""
    padded = f" {' '.join(text.lower().split())} "
    data = padded.encode("utf-8")
    ascii_only = len(data) == len(padded)  # then a byte slice is the character slice's encoding
    counts: dict[int, float] = {}
    crc32 = zlib.crc32
    for n in range(ngram_min, ngram_max + 1):
        for i in range(len(padded) - n + 1):
            gram = data[i : i + n] if ascii_only else padded[i : i + n].encode("utf-8")
            bucket = crc32(gram) % dim
            counts[bucket] = counts.get(bucket, 0.0) + 1.0
    feats = {k: math.log1p(v) for k, v in counts.items()}
    norm = math.sqrt(sum(v * v for v in feats.values()))
    return {k: v / norm for k, v in feats.items()} if norm else feats
