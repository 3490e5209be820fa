"""Ledger parameters and genesis balances, read from genesis.json.

Parameters live in ``genesis.params`` beside other subsystems' keys (which are ignored here).
An amount parameter is a JSON integer or, better for amounts over 2**53, a decimal integer
string in smallest units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..genesis import Genesis
from .codec import check_chain_id
from .exceptions import GenesisError, MalformedTx
from .types import ACCOUNT_SIZE, MAX_AMOUNT

DEFAULT_UNBONDING_BLOCKS = 10
DEFAULT_MIN_FEE = 0
DEFAULT_BLOCK_REWARD = 0
MAX_UNBONDING_BLOCKS = 4096  # bounds the unbonding entries per account (one per release height)

_DIGITS = re.compile(r"[0-9]{1,40}")
_HEX_ACCOUNT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LedgerParams:
    unbonding_blocks: int = DEFAULT_UNBONDING_BLOCKS
    min_fee: int = DEFAULT_MIN_FEE
    block_reward: int = DEFAULT_BLOCK_REWARD

    @classmethod
    def from_genesis_params(cls, params: dict[str, Any]) -> LedgerParams:
        return cls(
            unbonding_blocks=_integer(params, "unbonding_blocks", DEFAULT_UNBONDING_BLOCKS, MAX_UNBONDING_BLOCKS),
            min_fee=_integer(params, "min_fee", DEFAULT_MIN_FEE, MAX_AMOUNT),
            block_reward=_integer(params, "block_reward", DEFAULT_BLOCK_REWARD, MAX_AMOUNT),
        )

    def validate(self) -> None:
        for name, maximum in (
            ("unbonding_blocks", MAX_UNBONDING_BLOCKS),
            ("min_fee", MAX_AMOUNT),
            ("block_reward", MAX_AMOUNT),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= maximum:
                raise GenesisError(f"params.{name} must be an integer in [0, {maximum}], got {value!r}")


def _integer(params: dict[str, Any], name: str, default: int, maximum: int) -> int:
    value = params.get(name, default)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 0 <= value <= maximum:
        raise GenesisError(f"params.{name} must be an integer in [0, {maximum}] (or its decimal string), got {value!r}")
    return value


def genesis_chain_id(chain_id: object) -> str:
    """The genesis chain id, checked as transactions will carry it (1..64 UTF-8 bytes)."""
    try:
        return check_chain_id(chain_id)
    except MalformedTx as exc:
        raise GenesisError(f"chain_id: {exc}") from None


def parse_account_hex(text: object, where: str) -> bytes:
    """A 32-byte account from its 64-char lowercase hex (the only accepted spelling)."""
    if not isinstance(text, str) or not _HEX_ACCOUNT.fullmatch(text):
        raise GenesisError(f"{where}: account {text!r} is not 64 lowercase hex characters")
    account = bytes.fromhex(text)
    assert len(account) == ACCOUNT_SIZE
    return account


def genesis_balances(genesis: Genesis) -> dict[bytes, int]:
    """Genesis balances as ``{account: amount}``, zero balances dropped, total <= 2**128-1."""
    return genesis_holdings(genesis)[0]


def genesis_holdings(genesis: Genesis) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """Genesis ``(balances, stakes)``, each ``{account: amount}`` with zeros dropped; the sum of
    both (the genesis supply) is at most 2**128-1."""
    genesis_chain_id(genesis.chain_id)
    total = 0
    out: tuple[dict[bytes, int], dict[bytes, int]] = ({}, {})
    for name, amounts, parsed in (("balances", genesis.balances, out[0]), ("stakes", genesis.stakes, out[1])):
        for key, amount in amounts.items():
            account = parse_account_hex(key, name)
            if not isinstance(amount, str) or not _DIGITS.fullmatch(amount):
                raise GenesisError(f"{name}[{key}]: {amount!r} is not a decimal integer string in smallest units")
            value = int(amount)
            total += value
            if value > MAX_AMOUNT or total > MAX_AMOUNT:
                raise GenesisError(f"{name}[{key}]: total genesis supply exceeds 2**128-1")
            if value:
                parsed[account] = value
    return out
