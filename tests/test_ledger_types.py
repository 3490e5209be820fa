"""Amounts (format/parse) and the ledger exception hierarchy."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.exceptions import PrsmError
from prsm_node.ledger import (
    MAX_AMOUNT,
    UNIT,
    Account,
    AmountOutOfRange,
    InvalidAmountString,
    LedgerError,
    format_amount,
    parse_amount,
)
from prsm_node.ledger import exceptions as exc_mod


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("0", 0),
        ("1", UNIT),
        ("1.5", 3 * UNIT // 2),
        ("0.000000000000000001", 1),
        ("42.100000000000000000", 42 * UNIT + UNIT // 10),
        ("340282366920938463463.374607431768211455", MAX_AMOUNT),
    ],
)
def test_parse_amount(text: str, units: int) -> None:
    assert parse_amount(text) == units


@pytest.mark.parametrize(
    ("units", "text"),
    [(0, "0"), (1, "0.000000000000000001"), (UNIT, "1"), (3 * UNIT // 2, "1.5"), (10 * UNIT, "10")],
)
def test_format_amount(units: int, text: str) -> None:
    assert format_amount(units) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-1",
        "+1",
        "1e18",
        "1E2",
        "1.",
        ".5",
        "01",
        "00.5",
        " 1",
        "1 ",
        "1_000",
        "0x10",
        "1.2.3",
        "nan",
        "0.0000000000000000001",
        "١",
        "1,5",
        "inf",
        "1.5e-3",
    ],
)
def test_parse_amount_rejects_junk(text: str) -> None:
    with pytest.raises(InvalidAmountString):
        parse_amount(text)


@pytest.mark.parametrize("text", ["340282366920938463463.374607431768211456", "1" + "0" * 60, "9" * 5000])
def test_parse_amount_rejects_overflow(text: str) -> None:
    with pytest.raises(AmountOutOfRange):
        parse_amount(text)


def test_parse_amount_rejects_non_strings() -> None:
    with pytest.raises(InvalidAmountString):
        parse_amount(15)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, MAX_AMOUNT + 1, 1.5, True])
def test_format_amount_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(AmountOutOfRange):
        format_amount(bad)  # type: ignore[arg-type]


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=MAX_AMOUNT))
def test_format_parse_round_trip(units: int) -> None:
    assert parse_amount(format_amount(units)) == units


def test_account_total_and_empty() -> None:
    assert Account().is_empty
    assert not Account(nonce=1).is_empty
    assert Account(balance=1, stake=2, unbonding=((3, 10), (4, 11))).total == 10


def test_every_ledger_error_is_documented_and_rooted() -> None:
    classes = [c for _, c in inspect.getmembers(exc_mod, inspect.isclass) if issubclass(c, LedgerError)]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, PrsmError)
        doc = inspect.getdoc(cls) or ""
        if cls is not LedgerError:
            assert doc.startswith("Raised "), cls.__name__
