"""Decoding msgpack from untrusted bytes, the one way every PRSM codec does it.

Size-limited before parsing (and every string, bin, array and map within the limit), no ext
types, no non-string map keys, and any parse failure turned into the caller's own decode
error, with a message naming what was being decoded. Canonical-form checks (re-encode and
compare) stay with each codec, which knows its schema.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, NoReturn

import msgpack


def unpack_strict(data: object, limit: int, what: str, error: type[Exception]) -> Any:
    """One msgpack value from at most ``limit`` untrusted bytes; ``error(message)`` otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise error(f"{what} is {len(data)} bytes, over the {limit}-byte limit")

    def reject_ext(code: int, _data: bytes) -> NoReturn:
        raise error(f"{what}: msgpack ext type {code} is not allowed")

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=reject_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except error:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise error(f"{what} is not valid msgpack: {type(exc).__name__}: {exc}") from None


def error_reply_problem(code: object, message: object, codes: Container[int], max_message: int) -> str | None:
    """What is wrong with an ``ERROR(code, message)`` reply's fields, or None: the code must be
    one of ``codes`` (ints, not bools) and the message a string of at most ``max_message``
    UTF-8 bytes."""
    if not isinstance(code, int) or isinstance(code, bool) or code not in codes:
        return f"unknown error code {code!r}"
    if type(message) is not str:
        return "error message must be a string"
    try:
        size = len(message.encode("utf-8"))
    except UnicodeEncodeError:
        return "error message is not encodable as UTF-8"
    if size > max_message:
        return f"error message over {max_message} UTF-8 bytes"
    return None


def describe(value: object) -> str:
    """A decoded value's type (and length), for error messages: never the value itself."""
    if isinstance(value, bytes | str | list):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__
