"""Model names and versions: DHT keys for name lookups, and which version is the latest.

Keys (32 bytes, for the Kademlia value/provider space):

    name_key(name)             = SHA-256(b"prsm-model-name-v1"    + utf8(name))
    version_key(name, version) = SHA-256(b"prsm-model-version-v1" + utf8(name) + b":" + utf8(version))

Names and versions are used exactly as written (case-sensitive, no normalization); neither
may hold ``:`` (see manifest.NAME_RE / VERSION_RE), so ``name:version`` parses one way.

"Latest" order (``version_order``): a version made only of dot-separated decimal integers
(``1``, ``1.10.2``) is *numeric* and compares as its tuple of integers with trailing zero
parts dropped (``1.2 == 1.2.0 < 1.10``); any other version (``1.0-rc1``, ``beta``) ranks
below every numeric one and those compare bytewise among themselves. Ties (``1.2`` vs
``1.2.0``, or the same version from two publishers) are broken by the version string, so the
order is total; a caller choosing between publishers of one version must decide on trust.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .exceptions import InvalidManifest
from .manifest import MAX_NAME_SIZE, MAX_VERSION_SIZE, NAME_RE, VERSION_RE

NAME_KEY_DOMAIN = b"prsm-model-name-v1"
VERSION_KEY_DOMAIN = b"prsm-model-version-v1"
_NUMERIC = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_name(name: str) -> str:
    if type(name) is not str or len(name) > MAX_NAME_SIZE or not NAME_RE.fullmatch(name):
        raise InvalidManifest(f"model name {name!r} does not match {NAME_RE.pattern} (1..{MAX_NAME_SIZE} bytes)")
    return name


def check_version(version: str) -> str:
    if type(version) is not str or len(version) > MAX_VERSION_SIZE or not VERSION_RE.fullmatch(version):
        raise InvalidManifest(f"version {version!r} does not match {VERSION_RE.pattern} (1..{MAX_VERSION_SIZE} bytes)")
    return version


def name_key(name: str) -> bytes:
    """The DHT key under which the versions of model ``name`` are found."""
    return hashlib.sha256(NAME_KEY_DOMAIN + check_name(name).encode("ascii")).digest()


def version_key(name: str, version: str) -> bytes:
    """The DHT key under which manifests of ``name:version`` are found."""
    raw = check_name(name).encode("ascii") + b":" + check_version(version).encode("ascii")
    return hashlib.sha256(VERSION_KEY_DOMAIN + raw).digest()


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name:version"`` -> ``(name, version)``; ``"name"`` -> ``(name, None)`` (the latest)."""
    name, sep, version = ref.partition(":")
    return check_name(name), (check_version(version) if sep else None)


def version_order(version: str) -> tuple[int, tuple[int, ...], bytes]:
    """Sort key for versions: the later version has the larger key (see the module docstring)."""
    raw = version.encode("utf-8")
    if _NUMERIC.fullmatch(version):
        parts = [int(p) for p in version.split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return (1, tuple(parts), raw)
    return (0, (), raw)


def latest_version(versions: Iterable[str]) -> str | None:
    """The latest of ``versions`` by ``version_order``, or None if there are none."""
    return max(versions, key=version_order, default=None)
