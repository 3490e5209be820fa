"""The signature-check worker process: ``python -m prsm_node.ledger.verify_worker``.

Reads frames from stdin (4-byte big-endian length, then a msgpack array of
``[public_key, message, signature]`` triples) and answers each with a frame of one byte per
triple (1 valid, 0 not). Exits at end of input, so it never outlives the node that started it.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

import msgpack

from .batchverify import verify_triples

MAX_FRAME = 64 * 1024 * 1024


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    while True:
        header = _read_exactly(stdin, 4)
        if header is None:
            return
        size = int.from_bytes(header, "big")
        if size > MAX_FRAME:
            return
        body = _read_exactly(stdin, size)
        if body is None:
            return
        triples = [tuple(t) for t in msgpack.unpackb(body)]
        results = bytes(verify_triples(triples))
        stdout.write(len(results).to_bytes(4, "big") + results)
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
