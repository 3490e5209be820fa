"""The canonical ledger codec: round trips, strict decoding of untrusted bytes, signatures."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prsm_node.ledger import (
    MAX_AMOUNT,
    MAX_RECEIPTS,
    MAX_TX_SIZE,
    Account,
    AmountOutOfRange,
    LedgerDecodeError,
    MalformedTx,
    Receipt,
    Settle,
    Stake,
    Transfer,
    Tx,
    UnknownKind,
    Unstake,
    decode_account,
    decode_receipt,
    decode_tx,
    encode_account,
    encode_receipt,
    encode_tx,
    receipt_signing_payload,
    sign_receipt,
    sign_tx,
    signing_payload,
    tx_hash,
    verify_receipt_signature,
    verify_tx_signature,
)

EXAMPLES = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALICE = nacl.signing.SigningKey(b"\x01" * 32)
BOB = nacl.signing.SigningKey(b"\x02" * 32)
A, B = bytes(ALICE.verify_key), bytes(BOB.verify_key)
CHAIN = "prsm-test"

accounts = st.binary(min_size=32, max_size=32)
amounts = st.integers(min_value=0, max_value=MAX_AMOUNT) | st.sampled_from([0, 1, 2**64 - 1, 2**64, MAX_AMOUNT])
chain_ids = st.text(min_size=1, max_size=24).filter(lambda s: len(s.encode()) <= 64)
sigs = st.binary(min_size=64, max_size=64)
receipts = st.builds(
    Receipt,
    receipt_id=st.binary(min_size=32, max_size=32),
    payer=accounts,
    payee=accounts,
    amount=amounts,
    chain_id=chain_ids,
    signature=sigs,
)
bodies = st.one_of(
    st.builds(Transfer, to=accounts, amount=amounts),
    st.builds(Stake, amount=amounts),
    st.builds(Unstake, amount=amounts),
    st.builds(Settle, receipts=st.lists(receipts, min_size=1, max_size=4).map(tuple)),
)
txs = st.builds(
    Tx,
    chain_id=chain_ids,
    sender=accounts,
    nonce=st.integers(min_value=0, max_value=2**64 - 1),
    fee=amounts,
    body=bodies,
    signature=sigs,
)
account_states = st.builds(
    Account,
    balance=amounts,
    nonce=st.integers(min_value=0, max_value=2**64 - 1),
    stake=amounts,
    unbonding=st.lists(st.tuples(amounts, st.integers(min_value=0, max_value=2**64 - 1)), max_size=3).map(tuple),
)


def transfer(nonce: int = 0, amount: int = 5, fee: int = 1, chain: str = CHAIN) -> Tx:
    return sign_tx(ALICE, chain_id=chain, nonce=nonce, fee=fee, body=Transfer(B, amount))


def fields(tx: Tx) -> list[object]:
    return msgpack.unpackb(encode_tx(tx), raw=False)  # type: ignore[no-any-return]


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# ------------------------------------------------------------ properties


@EXAMPLES
@given(txs)
def test_tx_round_trip_is_byte_identical(tx: Tx) -> None:
    data = encode_tx(tx)
    assert decode_tx(data) == tx
    assert encode_tx(decode_tx(data)) == data
    assert tx_hash(tx) == hashlib.sha256(data).digest()


@EXAMPLES
@given(txs)
def test_signing_payload_cut_from_the_encoding_equals_the_built_one(tx: Tx) -> None:
    """signing_payload takes a shortcut once a tx has been encoded: the same bytes."""
    built = signing_payload(dataclasses.replace(tx))  # a fresh object: no cached encoding
    encoded = decode_tx(encode_tx(tx))
    assert signing_payload(encoded) == built


@EXAMPLES
@given(receipts)
def test_receipt_round_trip(r: Receipt) -> None:
    data = encode_receipt(r)
    assert decode_receipt(data) == r and encode_receipt(decode_receipt(data)) == data


@EXAMPLES
@given(account_states)
def test_account_round_trip(a: Account) -> None:
    data = encode_account(a)
    assert decode_account(data) == a and encode_account(decode_account(data)) == data


@EXAMPLES
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    for decode, encode in ((decode_tx, encode_tx), (decode_receipt, encode_receipt), (decode_account, encode_account)):
        try:
            obj = decode(data)
        except LedgerDecodeError:
            continue
        assert encode(obj) == data  # type: ignore[arg-type]


@EXAMPLES
@given(txs, st.data())
def test_mutated_bytes_raise_only_decode_errors(tx: Tx, data: st.DataObject) -> None:
    encoded = bytearray(encode_tx(tx))
    i = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[i] = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != encoded[i]))
    try:
        decoded = decode_tx(bytes(encoded))
    except LedgerDecodeError:
        return
    assert decoded != tx and encode_tx(decoded) == bytes(encoded)


@settings(max_examples=20, deadline=None)
@given(txs)
def test_every_truncation_is_rejected(tx: Tx) -> None:
    data = encode_tx(tx)
    for cut in range(len(data)):
        with pytest.raises(LedgerDecodeError):
            decode_tx(data[:cut])


# ------------------------------------------------------------ specific bad input


def test_trailing_bytes() -> None:
    with pytest.raises(LedgerDecodeError, match="msgpack"):
        decode_tx(encode_tx(transfer()) + b"\xc0")


@pytest.mark.parametrize("tag", [0, 6, 9, 127, 2**32])
def test_unknown_kind(tag: int) -> None:
    f = fields(transfer())
    f[4] = [tag, pack(1)]
    with pytest.raises(UnknownKind, match=f"unknown transaction kind {tag}"):
        decode_tx(pack(f))


@pytest.mark.parametrize("tag", [True, -1, "1", b"\x01", 1.0, None])
def test_kind_of_wrong_type(tag: object) -> None:
    f = fields(transfer())
    f[4] = [tag, B, bytes(16)]
    with pytest.raises(LedgerDecodeError):
        decode_tx(pack(f))


@pytest.mark.parametrize(
    ("index", "value", "why"),
    [
        (0, CHAIN.encode(), "chain id"),  # bin where a str is due
        (0, "", "chain id"),
        (0, "x" * 65, "chain id"),
        (1, A[:31], "sender"),
        (1, A.hex(), "sender"),
        (2, -1, "nonce"),
        (2, 1.0, "nonce"),
        (2, True, "nonce"),
        (2, None, "nonce"),
        (3, 5, "fee"),  # an int where a 16-byte amount is due
        (3, bytes(15), "fee"),
        (3, bytes(17), "fee"),
        (5, bytes(63), "signature"),
        (5, b"", "signature"),
    ],
)
def test_wrong_field_type_or_length(index: int, value: object, why: str) -> None:
    f = fields(transfer())
    f[index] = value
    with pytest.raises(LedgerDecodeError, match=why):
        decode_tx(pack(f))


@pytest.mark.parametrize(
    "body",
    [
        [1, A],  # too short
        [1, A, bytes(16), b"x"],  # too long
        [1, A, (2**128).to_bytes(17, "big")],  # overflowing amount
        [1, A, 5],
        [2, bytes(16), bytes(16)],
        [3],
        [4, []],
        [4, [[b"x"] * 6]],
        [4, "receipts"],
        [],
        {"kind": 1},
        "transfer",
    ],
)
def test_malformed_bodies(body: object) -> None:
    f = fields(transfer())
    f[4] = body
    with pytest.raises(LedgerDecodeError):
        decode_tx(pack(f))


def test_non_canonical_forms_are_rejected() -> None:
    tx = transfer(nonce=5)
    good = encode_tx(tx)
    nonce_at = good.index(A) + 32
    assert good[nonce_at] == 5
    as_u8 = good[:nonce_at] + b"\xcc\x05" + good[nonce_at + 1 :]
    as_u32 = good[:nonce_at] + b"\xce\x00\x00\x00\x05" + good[nonce_at + 1 :]
    chain_str8 = good.replace(b"\xa9" + CHAIN.encode(), b"\xd9\x09" + CHAIN.encode(), 1)
    array16 = b"\xdc\x00\x06" + good[1:]
    for data in (as_u8, as_u32, chain_str8, array16):
        assert msgpack.unpackb(data, raw=False) == msgpack.unpackb(good, raw=False)  # same content
        with pytest.raises(LedgerDecodeError, match="canonical"):
            decode_tx(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        pack({"chain_id": CHAIN}),
        pack([1, 2, 3]),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        b"\x91" * 5000 + b"\xc0",  # deep nesting
        pack([CHAIN, A, 0, bytes(16), [1, A, bytes(16)], bytes(64), None]),
    ],
)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(LedgerDecodeError):
        decode_tx(data)


def test_invalid_utf8_chain_id() -> None:
    good = encode_tx(transfer())
    bad = good.replace(b"\xa9" + CHAIN.encode(), b"\xa9\xff" + CHAIN.encode()[1:], 1)
    with pytest.raises(LedgerDecodeError):
        decode_tx(bad)


def test_size_limit_and_max_receipts() -> None:
    long_chain = "c" * 64
    rs = tuple(
        sign_receipt(BOB, receipt_id=i.to_bytes(32, "big"), payee=A, amount=MAX_AMOUNT, chain_id=long_chain)
        for i in range(MAX_RECEIPTS)
    )
    biggest = sign_tx(ALICE, chain_id=long_chain, nonce=2**64 - 1, fee=MAX_AMOUNT, body=Settle(rs))
    data = encode_tx(biggest)
    assert len(data) <= MAX_TX_SIZE and decode_tx(data) == biggest
    too_many = dataclasses.replace(biggest, body=Settle((*rs, rs[0])))
    with pytest.raises(MalformedTx, match="receipts"):
        encode_tx(too_many)
    f = fields(biggest)
    f[4][1].append(f[4][1][0])  # type: ignore[index]
    with pytest.raises(LedgerDecodeError):
        decode_tx(pack(f))
    with pytest.raises(LedgerDecodeError, match="limit"):
        decode_tx(data + bytes(MAX_TX_SIZE))


# ------------------------------------------------------------ encode refuses what decode would


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"fee": -1}, AmountOutOfRange),
        ({"fee": MAX_AMOUNT + 1}, AmountOutOfRange),
        ({"body": Transfer(B, MAX_AMOUNT + 1)}, AmountOutOfRange),
        ({"body": Transfer(B, -5)}, AmountOutOfRange),
        ({"body": Stake(2**200)}, AmountOutOfRange),
        ({"body": Unstake(-1)}, AmountOutOfRange),
        ({"body": Transfer(B, 1.5)}, MalformedTx),  # type: ignore[arg-type]
        ({"body": Transfer(B[:31], 1)}, MalformedTx),
        ({"body": Settle(())}, MalformedTx),
        ({"body": "transfer"}, MalformedTx),
        ({"nonce": -1}, MalformedTx),
        ({"nonce": 2**64}, MalformedTx),
        ({"nonce": True}, MalformedTx),
        ({"sender": bytearray(A)}, MalformedTx),
        ({"signature": b""}, MalformedTx),
        ({"chain_id": ""}, MalformedTx),
        ({"chain_id": "\ud800"}, MalformedTx),
        ({"chain_id": "é" * 33}, MalformedTx),
    ],
)
def test_encode_rejects_out_of_range_fields(change: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_tx(dataclasses.replace(transfer(), **change))  # type: ignore[arg-type]


def test_receipt_amount_out_of_range_at_encode() -> None:
    r = sign_receipt(BOB, receipt_id=bytes(32), payee=A, amount=1, chain_id=CHAIN)
    with pytest.raises(AmountOutOfRange):
        encode_receipt(dataclasses.replace(r, amount=MAX_AMOUNT + 1))


# ------------------------------------------------------------ signatures


def test_sign_and_verify_tx() -> None:
    tx = transfer()
    assert tx.sender == A and len(tx.signature) == 64
    assert verify_tx_signature(tx)
    assert ALICE.verify_key.verify(signing_payload(tx), tx.signature)
    for change in ({"nonce": 1}, {"fee": 2}, {"chain_id": "other"}, {"body": Transfer(B, 6)}, {"sender": B}):
        assert not verify_tx_signature(dataclasses.replace(tx, **change))
    assert not verify_tx_signature(dataclasses.replace(tx, signature=bytes(64)))


def test_signing_payload_binds_domain_chain_and_nonce() -> None:
    tx = transfer()
    decoded = msgpack.unpackb(signing_payload(tx), raw=False)
    assert decoded[:4] == ["prsm-tx-v1", CHAIN, A, 0]
    assert signing_payload(tx) == signing_payload(dataclasses.replace(tx, signature=b""))
    assert signing_payload(tx) != signing_payload(transfer(chain="prsm-other"))
    assert signing_payload(tx) != signing_payload(transfer(nonce=1))


def test_sign_and_verify_receipt() -> None:
    r = sign_receipt(BOB, receipt_id=b"\x07" * 32, payee=A, amount=10, chain_id=CHAIN)
    assert r.payer == B and verify_receipt_signature(r)
    assert msgpack.unpackb(receipt_signing_payload(r), raw=False)[0] == "prsm-receipt-v1"
    for change in ({"amount": 11}, {"payee": B}, {"chain_id": "x"}, {"receipt_id": bytes(32)}, {"payer": A}):
        assert not verify_receipt_signature(dataclasses.replace(r, **change))


def test_signatures_are_deterministic() -> None:
    assert transfer() == transfer()
    assert tx_hash(transfer()) == tx_hash(transfer())
    assert tx_hash(transfer()) != tx_hash(transfer(nonce=1))
