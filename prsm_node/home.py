"""The node's home directory: its layout, ``init``, the networks it can join, and the lock.

<home>/config.toml     typed config (see config.py)
<home>/genesis.json    the network this node belongs to
<home>/keys/node_key   Ed25519 seed, mode 0600
<home>/data/           LevelDB and, later, shard chunks
<home>/control.sock    local control socket, mode 0600
<home>/node.lock       held by the running daemon
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import config as config_mod
from .exceptions import ConfigError, HomeError, LockedError
from .genesis import Genesis, Validator, development_genesis
from .keys import NodeKey

DEV_NETWORK = "dev"
# Unix socket paths are limited to 108 bytes including the terminating NUL on Linux.
MAX_SOCKET_PATH = 107


def default_home() -> Path:
    env = os.environ.get("PRSM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".prsm"


def networks_dir() -> Path:
    """Where the shipped networks live: the wheel's copy, else the repository's bootstrap/."""
    env = os.environ.get("PRSM_BOOTSTRAP_DIR")
    if env:
        return Path(env)
    packaged = Path(__file__).with_name("_bootstrap")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "bootstrap"


@dataclass(frozen=True)
class Network:
    """A network a node can join: ``<dir>/genesis.json`` and ``<dir>/peers.txt``."""

    name: str
    path: Path

    @property
    def genesis_path(self) -> Path:
        return self.path / "genesis.json"

    def bootstrap_peers(self) -> list[str]:
        peers_file = self.path / "peers.txt"
        if not peers_file.exists():
            return []
        peers = []
        for n, raw in enumerate(peers_file.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if line:
                config_mod.parse_multiaddr(line, f"{peers_file}:{n}", need_peer_id=True)
                peers.append(line)
        return peers


def find_network(name: str) -> Network | None:
    """Resolve ``--network NAME``: a path to a network folder, or a folder under bootstrap/."""
    if name == DEV_NETWORK:
        return None
    as_path = Path(name).expanduser()
    if (as_path / "genesis.json").is_file():
        return Network(as_path.name, as_path.resolve())
    shipped = networks_dir() / name
    if (shipped / "genesis.json").is_file():
        return Network(name, shipped)
    known = sorted(p.name for p in networks_dir().glob("*/genesis.json"))
    raise ConfigError(
        f"unknown network {name!r}: not a folder with genesis.json, and not one of {', '.join([DEV_NETWORK, *known])}"
    )


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def genesis_path(self) -> Path:
        return self.path / "genesis.json"

    @property
    def key_path(self) -> Path:
        return self.path / "keys" / "node_key"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def lock_path(self) -> Path:
        return self.path / "node.lock"

    def exists(self) -> bool:
        return self.config_path.exists() or self.key_path.exists()

    def load_config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def load_key(self) -> NodeKey:
        return NodeKey.load(self.key_path)

    def load_genesis(self) -> Genesis:
        return Genesis.load(self.genesis_path)

    def network(self, cfg: config_mod.Config) -> Network | None:
        return find_network(cfg.node.network)

    def check_socket_path(self) -> None:
        if len(str(self.control_socket)) > MAX_SOCKET_PATH:
            raise HomeError(
                f"{self.control_socket}: path is longer than {MAX_SOCKET_PATH} bytes, "
                "too long for a Unix socket; use a shorter --home"
            )


def init_home(
    home: Home,
    *,
    network: str = DEV_NETWORK,
    force: bool = False,
    cfg: config_mod.Config | None = None,
    genesis: Genesis | None = None,
    key: NodeKey | None = None,
) -> NodeKey:
    """Write config, genesis and key into ``home``; refuse to overwrite without ``force``.

    ``genesis``/``key`` let the devnet hand every node a shared genesis and its own key.
    """
    if home.exists() and not force:
        raise HomeError(f"{home.path} already holds a PRSM node; pass --force to overwrite it")
    cfg = cfg if cfg is not None else config_mod.Config()
    cfg.node.network = network
    cfg.validate()
    net = find_network(network)
    key = key if key is not None else NodeKey.generate()
    if genesis is None:
        if net is not None:
            genesis = Genesis.load(net.genesis_path)
        else:
            me = Validator(account=key.account.hex(), peer_id=str(key.peer_id))
            genesis = development_genesis(DEV_NETWORK, [me], [me.account])
    if force and home.data_dir.exists():
        # A new key or genesis makes the old ledger and peer table meaningless.
        shutil.rmtree(home.data_dir)
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.data_dir.mkdir(exist_ok=True, mode=0o700)
    key.save(home.key_path)
    genesis.save(home.genesis_path)
    tmp = home.config_path.with_suffix(".tmp")
    tmp.write_text(config_mod.render(cfg, commented=False), encoding="utf-8")
    os.replace(tmp, home.config_path)
    return key


class HomeLock:
    """An exclusive flock on ``node.lock``: one daemon per home, released by the kernel on exit."""

    def __init__(self, home: Home) -> None:
        self._home = home
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = open(self._home.lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise LockedError(
                f"another prsm-node (pid {pid}) is already running on {self._home.path}; "
                f"stop it with `prsm-node stop --home {self._home.path}`"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
