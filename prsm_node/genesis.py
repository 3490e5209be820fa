"""genesis.json: which network a node belongs to.

It names the chain id (signatures include it, so nothing replays across networks), the
validators, the initial balances and the network parameters. The ledger and consensus
issues give the balances and parameters their meaning; here they are only carried and checked.
``stakes`` (optional, ledger r3) is stake each account holds from the start, beside its balance:
a network whose breaker voters or validators need stake does not have to wait for stake
transactions first. Empty stakes are left out of the JSON, so a genesis without them keeps the
id (protocols/ledger.md, "Storage") it had before the field existed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exceptions import ConfigError


@dataclass
class Validator:
    account: str  # hex Ed25519 public key
    peer_id: str
    power: int = 1


@dataclass
class Genesis:
    chain_id: str
    network: str
    genesis_time: int
    validators: list[Validator] = field(default_factory=list)
    balances: dict[str, str] = field(default_factory=dict)  # hex account -> integer amount
    params: dict[str, Any] = field(default_factory=dict)
    stakes: dict[str, str] = field(default_factory=dict)  # hex account -> integer stake

    def to_json(self) -> dict[str, Any]:
        out = {
            "chain_id": self.chain_id,
            "network": self.network,
            "genesis_time": self.genesis_time,
            "validators": [v.__dict__ for v in self.validators],
            "balances": self.balances,
            "params": self.params,
        }
        if self.stakes:
            out["stakes"] = self.stakes
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Genesis:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        try:
            validators = [Validator(**v) for v in data.get("validators", [])]
            gen = cls(
                chain_id=data["chain_id"],
                network=data["network"],
                genesis_time=int(data["genesis_time"]),
                validators=validators,
                balances=dict(data.get("balances", {})),
                params=dict(data.get("params", {})),
                stakes=dict(data.get("stakes", {})),
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed genesis: {exc}") from None
        if not isinstance(gen.chain_id, str) or not gen.chain_id:
            raise ConfigError(f"{where}: chain_id must be a non-empty string")
        for name, amounts in (("balances", gen.balances), ("stakes", gen.stakes)):
            for account, amount in amounts.items():
                if not (isinstance(amount, str) and amount.isdigit()):
                    raise ConfigError(f"{where}: {name}[{account!r}] must be a decimal integer string")
        return gen

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Genesis:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: genesis not found (run `prsm-node init`)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_json(data, str(path))


def development_genesis(
    network: str, validators: list[Validator], accounts: list[str], *, balance: int = 10**24, stake: int = 0
) -> Genesis:
    """A fresh development network: the given validators, each account funded (and staked
    ``stake``, when not 0)."""
    return Genesis(
        chain_id=f"prsm-{network}-{os.urandom(4).hex()}",
        network=network,
        genesis_time=int(time.time()),
        validators=validators,
        balances={acct: str(balance) for acct in accounts},
        params={"decimals": 18},
        stakes={acct: str(stake) for acct in accounts} if stake else {},
    )
