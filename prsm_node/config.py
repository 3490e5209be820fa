"""Typed node configuration: sections with defaults, a test variant, and validation.

``config.toml`` in the home maps onto :class:`Config`. Every key has a default, so an empty
file is a valid config. Unknown sections or keys, wrong types and bad values raise
:class:`ConfigError` naming ``[section].key``. ``node.example.toml`` is rendered from the
same field definitions (:func:`render_example`), so the documentation cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr

from .exceptions import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its documentation line for node.example.toml."""
    return field(metadata={"doc": text}, **kw)


@dataclass
class NodeSection:
    network: str = _doc(
        "Network to join: a folder name under bootstrap/ (or a path to such a folder), "
        'or "dev" for a private single-node development network.',
        default="dev",
    )
    log_level: str = _doc("Log level: debug, info, warning or error.", default="info")
    log_format: str = _doc('Log format: "text" (readable) or "json" (one object a line).', default="text")

    def validate(self) -> None:
        _one_of("node", "log_level", self.log_level, LOG_LEVELS)
        _one_of("node", "log_format", self.log_format, LOG_FORMATS)
        if not self.network:
            raise ConfigError("[node].network: must not be empty")


@dataclass
class P2PSection:
    listen: list[str] = _doc(
        "Multiaddrs to listen on (TCP). Port 0 picks a free port.",
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/7401"],
    )
    bootstrap: list[str] = _doc(
        "Extra bootstrap peers (/ip4/…/tcp/…/p2p/<peer id>), added to the network's own list.",
        default_factory=list,
    )
    dial_timeout: float = _doc("Seconds to wait for one outbound connection.", default=10.0)
    max_connections: int = _doc("Most simultaneous connections (inbound and outbound).", default=400)

    def validate(self) -> None:
        if not self.listen:
            raise ConfigError("[p2p].listen: at least one address is required")
        for i, addr in enumerate(self.listen):
            parse_multiaddr(addr, f"[p2p].listen[{i}]", need_peer_id=False)
        for i, addr in enumerate(self.bootstrap):
            parse_multiaddr(addr, f"[p2p].bootstrap[{i}]", need_peer_id=True)
        _positive("p2p", "dial_timeout", self.dial_timeout)
        _positive("p2p", "max_connections", self.max_connections)


@dataclass
class DiscoverySection:
    bucket_size: int = _doc("Kademlia k: peers per bucket and lookup result size (1 to 60).", default=20)
    alpha: int = _doc("Kademlia alpha: parallel requests in a lookup.", default=3)
    request_timeout: float = _doc("Seconds to wait for one Kademlia request.", default=5.0)
    refresh_interval: float = _doc("Seconds between routing table refreshes.", default=300.0)
    bootstrap_backoff_initial: float = _doc(
        "Seconds before the first retry of an unreachable bootstrap peer (doubles each try).",
        default=1.0,
    )
    bootstrap_backoff_max: float = _doc("Longest wait between bootstrap retries, in seconds.", default=60.0)
    max_saved_peers: int = _doc("Known peers saved for redialling after a restart.", default=200)

    def validate(self) -> None:
        if not 1 <= self.bucket_size <= 60:
            raise ConfigError(f"[discovery].bucket_size: must be between 1 and 60, got {self.bucket_size}")
        for name in (
            "bucket_size",
            "alpha",
            "request_timeout",
            "refresh_interval",
            "bootstrap_backoff_initial",
            "bootstrap_backoff_max",
            "max_saved_peers",
        ):
            _positive("discovery", name, getattr(self, name))
        if self.bootstrap_backoff_max < self.bootstrap_backoff_initial:
            raise ConfigError("[discovery].bootstrap_backoff_max: must be at least bootstrap_backoff_initial")


@dataclass
class LedgerSection:
    block_interval: float = _doc(
        "Least seconds between two blocks (a validator makes blocks only while transactions wait).", default=1.0
    )
    max_block_txs: int = _doc("Most transactions in one block (1 to 4096).", default=1000)
    mempool_size: int = _doc(
        "Most pending transactions held; when full, a higher fee evicts the cheapest.", default=10000
    )
    mempool_per_sender: int = _doc("Most pending transactions from one account.", default=64)
    rebroadcast_interval: float = _doc(
        "Seconds before a pending transaction is sent to the validators again.", default=10.0
    )
    confirm_timeout: float = _doc("Seconds `ledger transfer` and friends wait for their block.", default=30.0)

    def validate(self) -> None:
        for name in (
            "block_interval",
            "max_block_txs",
            "mempool_size",
            "mempool_per_sender",
            "rebroadcast_interval",
            "confirm_timeout",
        ):
            _positive("ledger", name, getattr(self, name))
        if self.max_block_txs > 4096:
            raise ConfigError(f"[ledger].max_block_txs: at most 4096, got {self.max_block_txs}")


@dataclass
class ConsensusSection:
    checkpoint_interval: int = _doc("PBFT K: blocks between checkpoints (validators only).", default=16)
    log_window: int = _doc(
        "PBFT L: blocks in flight past the last stable checkpoint (a multiple of K).", default=32
    )
    view_change_timeout: float = _doc("Seconds a request may wait to commit before a view change.", default=2.0)
    max_view_change_timeout: float = _doc("Longest view-change timeout after repeated failures.", default=60.0)
    status_interval: float = _doc("Seconds between retransmissions while a replica waits.", default=0.5)

    def validate(self) -> None:
        from .consensus.exceptions import ConfigurationError

        try:
            self.params().validate()
        except ConfigurationError as exc:
            raise ConfigError(str(exc)) from None

    def params(self) -> Any:
        """The replica's PbftParams (batch limits stay at the protocol's defaults)."""
        from .consensus.params import PbftParams

        return PbftParams(
            checkpoint_interval=self.checkpoint_interval,
            log_window=self.log_window,
            view_change_timeout=self.view_change_timeout,
            max_view_change_timeout=self.max_view_change_timeout,
            status_interval=self.status_interval,
        )


@dataclass
class BreakerSection:
    heartbeat_interval: int = _doc("Whole seconds between gossipsub heartbeats on the breaker topic.", default=1)
    catchup_interval: float = _doc("Seconds between asking a random peer for the current votes.", default=60.0)
    max_faults: int = _doc("Invalid votes from one peer before it is disconnected.", default=3)
    sync_interval: float = _doc("Seconds between anti-entropy vote digest exchanges while votes move.", default=1.0)
    sync_idle_interval: float = _doc("Longest interval between digest exchanges while nothing changes.", default=8.0)

    def validate(self) -> None:
        for name in ("heartbeat_interval", "catchup_interval", "max_faults", "sync_interval", "sync_idle_interval"):
            _positive("breaker", name, getattr(self, name))


@dataclass
class ShardsSection:
    quota_bytes: int = _doc("Most bytes of model chunks kept under data/ (0: no limit).", default=0)
    chunk_size: int = _doc(
        "Chunk size for models this node publishes (a power of two, 1 KiB to 4 MiB).", default=1 << 20
    )
    max_streams_per_peer: int = _doc("Concurrent shard streams served to one peer (1 to 4).", default=4)
    fetch_parallel_peers: int = _doc(
        "Most providers one fetch pulls chunks from at once (it ramps up from one while that raises its rate).",
        default=4)
    fetch_response_timeout: float = _doc("Seconds to wait for each frame of a provider's answer.", default=30.0)
    fetch_max_failures: int = _doc("Bad or failed answers before a provider is dropped from a fetch.", default=3)

    def validate(self) -> None:
        if self.quota_bytes < 0:
            raise ConfigError(f"[shards].quota_bytes: must not be negative, got {self.quota_bytes}")
        size = self.chunk_size
        if size < 1024 or size > 4 << 20 or size & (size - 1):
            raise ConfigError(f"[shards].chunk_size: must be a power of two from 1024 to 4194304, got {size}")
        if not 1 <= self.max_streams_per_peer <= 4:
            raise ConfigError(f"[shards].max_streams_per_peer: must be 1 to 4, got {self.max_streams_per_peer}")
        for name in ("fetch_parallel_peers", "fetch_response_timeout", "fetch_max_failures"):
            _positive("shards", name, getattr(self, name))


@dataclass
class IpfsSection:
    api: str = _doc(
        "Multiaddr of a local IPFS HTTP API (e.g. /ip4/127.0.0.1/tcp/5001/http): published chunks are "
        "also put there as raw blocks, and a fetch asks it for chunks no peer provides (every chunk "
        "still checked against its SHA-256). Empty: IPFS is not used.",
        default="",
    )
    timeout: float = _doc("Seconds to wait for one IPFS API call.", default=30.0)

    def validate(self) -> None:
        if self.api:
            parse_multiaddr(self.api, "[ipfs].api", need_peer_id=False)
        _positive("ipfs", "timeout", self.timeout)


@dataclass
class AgentsSection:
    device: str = _doc('Where models run: "auto" (cuda when torch sees a GPU, else cpu) or "cpu".', default="auto")
    memory_limit_bytes: int = _doc("Most bytes of loaded models (weights + working memory).", default=4 << 30)
    max_batch_size: int = _doc("Requests for one model run together in one forward pass, at most.", default=16)
    max_batch_wait_s: float = _doc("Seconds a first request waits for others to batch with.", default=0.005)
    max_queue: int = _doc("Requests queued per model before new ones are refused as busy.", default=1024)
    torch_threads: int = _doc("CPU threads torch uses (0: torch's default).", default=0)

    def validate(self) -> None:
        _one_of("agents", "device", self.device, ("auto", "cpu", "cuda"))
        if self.memory_limit_bytes < 0:
            raise ConfigError("[agents].memory_limit_bytes: must not be negative")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError(f"[agents].max_batch_size: must be 1 to 1024, got {self.max_batch_size}")
        if not 0 <= self.max_batch_wait_s <= 10:
            raise ConfigError(f"[agents].max_batch_wait_s: must be 0 to 10, got {self.max_batch_wait_s}")
        _positive("agents", "max_queue", self.max_queue)
        if not 0 <= self.torch_threads <= 256:
            raise ConfigError(f"[agents].torch_threads: must be 0 to 256, got {self.torch_threads}")


@dataclass
class ControlSection:
    max_request_bytes: int = _doc("Largest control request line accepted, in bytes.", default=1048576)
    max_connections: int = _doc("Control connections served at once; more wait to be served.", default=1024)

    def validate(self) -> None:
        _positive("control", "max_request_bytes", self.max_request_bytes)
        if not 1 <= self.max_connections <= 65536:
            raise ConfigError(f"[control].max_connections: must be 1 to 65536, got {self.max_connections}")


@dataclass
class MetricsSection:
    enabled: bool = _doc("Serve Prometheus metrics over HTTP.", default=False)
    listen: str = _doc("host:port for metrics; only loopback hosts are accepted.", default="127.0.0.1:9464")

    def validate(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit() or int(port) > 65535:
            raise ConfigError(
                f"[metrics].listen: expected a loopback host:port such as 127.0.0.1:9464, got {self.listen!r}"
            )


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    p2p: P2PSection = field(default_factory=P2PSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    consensus: ConsensusSection = field(default_factory=ConsensusSection)
    breaker: BreakerSection = field(default_factory=BreakerSection)
    shards: ShardsSection = field(default_factory=ShardsSection)
    ipfs: IpfsSection = field(default_factory=IpfsSection)
    agents: AgentsSection = field(default_factory=AgentsSection)
    control: ControlSection = field(default_factory=ControlSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    @classmethod
    def for_tests(cls) -> Config:
        """Loopback on a free port, short timeouts: what in-process and daemon tests use."""
        cfg = cls()
        cfg.p2p.listen = ["/ip4/127.0.0.1/tcp/0"]
        cfg.p2p.dial_timeout = 3.0
        cfg.discovery.request_timeout = 2.0
        cfg.discovery.refresh_interval = 30.0
        cfg.discovery.bootstrap_backoff_initial = 0.1
        cfg.discovery.bootstrap_backoff_max = 2.0
        cfg.ledger.block_interval = 0.1
        cfg.ledger.rebroadcast_interval = 2.0
        cfg.consensus.view_change_timeout = 1.0
        cfg.consensus.max_view_change_timeout = 8.0
        cfg.shards.fetch_response_timeout = 5.0
        cfg.agents.device = "cpu"
        cfg.agents.memory_limit_bytes = 256 << 20
        cfg.agents.torch_threads = 1
        return cfg


def parse_multiaddr(text: str, where: str, *, need_peer_id: bool) -> multiaddr.Multiaddr:
    """Parse a multiaddr or raise ConfigError naming ``where``."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a multiaddr string, got {type(text).__name__}")
    try:
        ma = multiaddr.Multiaddr(text)
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ConfigError(f"{where}: invalid multiaddr {text!r}: {exc}") from None
    protos = [p.name for p in ma.protocols()]
    if "tcp" not in protos:
        raise ConfigError(f"{where}: {text!r} has no /tcp/ part (only TCP is supported)")
    if need_peer_id and "p2p" not in protos:
        raise ConfigError(f"{where}: {text!r} needs a /p2p/<peer id> part")
    return ma


def _one_of(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"[{section}].{key}: expected one of {', '.join(allowed)}, got {value!r}")


def _positive(section: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"[{section}].{key}: must be greater than 0, got {value!r}")


def _check_type(where: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the type of the field's default; ints are fine for floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # pragma: no cover - every field is one of the above
        ok = False
    if not ok:
        want = "list of strings" if isinstance(default, list) else type(default).__name__
        raise ConfigError(f"{where}: expected {want}, got {type(value).__name__} {value!r}")
    return value


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from parsed TOML, on top of ``base`` (defaults if None)."""
    cfg = base if base is not None else Config()
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, sec_value in data.items():
        if sec_name not in sections:
            hint = _did_you_mean(sec_name, sections)
            raise ConfigError(f"[{sec_name}]: unknown section{hint} (known: {', '.join(sections)})")
        if not isinstance(sec_value, dict):
            raise ConfigError(f"[{sec_name}]: expected a table, got {type(sec_value).__name__}")
        section = getattr(cfg, sec_name)
        keys = {f.name for f in dataclasses.fields(section)}
        for key, value in sec_value.items():
            if key not in keys:
                hint = _did_you_mean(key, keys)
                raise ConfigError(f"[{sec_name}].{key}: unknown key{hint} (known: {', '.join(sorted(keys))})")
            value = _check_type(f"[{sec_name}].{key}", value, getattr(section, key))
            setattr(section, key, value)
    cfg.validate()
    return cfg


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (run `prsm-node init`)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render(cfg: Config, *, commented: bool) -> str:
    """Render a config as TOML with a comment for every key.

    ``commented=True`` writes every key commented out (node.example.toml: the defaults);
    otherwise keys are live (config.toml written by ``init``).
    """
    lines = [
        "# PRSM node configuration. Every key is optional; shown with its default.",
        "# Unknown keys are an error, so a typo never goes unnoticed.",
    ]
    prefix = "# " if commented else ""
    for sec_field in dataclasses.fields(cfg):
        section = getattr(cfg, sec_field.name)
        lines += ["", f"[{sec_field.name}]"]
        for f in dataclasses.fields(section):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{prefix}{f.name} = {_toml_value(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"


def render_example() -> str:
    return render(Config(), commented=True)
