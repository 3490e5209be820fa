"""The model exchange: the ``/prsm/shard/1.0.0`` service, publishing, parallel verified fetches,
signed name records, and the ``model.*`` control methods. Built on the pure core in
prsm_node.shards; the rules are in protocols/shard.md ("Service behaviour")."""

from __future__ import annotations

from .control import ModelMethods
from .exceptions import (
    ExchangeError,
    FetchBusy,
    FetchFailed,
    ModelHalted,
    NameNotFound,
    NoProviders,
    ProtocolViolation,
    RemoteError,
    Unreachable,
)
from .fetch import Fetch
from .ipfs import IpfsBlocks, ipfs_from_config
from .schedule import FetchParams
from .service import ShardService

__all__ = [
    "ExchangeError",
    "Fetch",
    "FetchBusy",
    "FetchFailed",
    "FetchParams",
    "IpfsBlocks",
    "ModelHalted",
    "ModelMethods",
    "NameNotFound",
    "NoProviders",
    "ProtocolViolation",
    "RemoteError",
    "ShardService",
    "Unreachable",
    "ipfs_from_config",
]
