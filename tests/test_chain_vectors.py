"""protocols/tx-vectors.json: the `/prsm/tx/1.0.0` and `/prsm/sync/1.0.0` messages against the
spec's bytes.

scripts/gen_tx_vectors.py packs every message with plain msgpack from protocols/tx.md and
protocols/sync.md (not with prsm_node.chain.messages), so these tests check the codec and the
framing of the implementation against the documents, byte for byte.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from prsm_node.chain import messages as m
from prsm_node.ledger import exceptions as errors
from prsm_node.ledger.block import decode_block, decode_certificate
from prsm_node.ledger.codec import decode_tx, tx_hash
from prsm_node.wire import encode_uvarint, read_frame

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocols" / "tx-vectors.json").read_text())
LEDGER = json.loads((ROOT / "protocols" / "ledger-vectors.json").read_text())
TX_MESSAGES = {v["name"]: v for v in VECTORS["tx_protocol"]}
SYNC_MESSAGES = {v["name"]: v for v in VECTORS["sync_protocol"]}


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def test_tx_is_the_ledger_vector() -> None:
    tx = VECTORS["tx"]
    assert tx["hex"] == LEDGER["blocks"]["block"]["txs"][0]["hex"]
    assert tx_hash(decode_tx(_hex(tx["hex"]))).hex() == tx["hash"]


def _encode(v: dict[str, Any]) -> bytes:
    """The message rebuilt by prsm_node.chain.messages from the vector's readable fields."""
    f, name = v["fields"], v["name"]
    if "_error_" in name:
        return m.encode_error(f["code"], f["message"])
    if name == "submit":
        return m.encode_submit(_hex(f["tx"]))
    if name == "submit_ok":
        return m.encode_submitted(_hex(f["tx_hash"]))
    if name == "submit_many":
        return m.encode_submit_many([_hex(t) for t in f["txs"]])
    if name == "submit_many_ok":
        return m.encode_submitted_many(f["codes"])
    if name == "wait":
        return m.encode_wait(_hex(f["tx_hash"]), f["timeout_ms"])
    if name == "wait_committed":
        return m.encode_committed(_hex(f["tx_hash"]), f["height"], _hex(f["block_hash"]))
    if name == "get_blocks":
        return m.encode_get_blocks(f["from"], f["count"], f["wait_ms"])
    assert name.startswith("blocks")
    return m.encode_blocks(f["tip"], [(_hex(b["block"]), _hex(b["certificate"])) for b in f["blocks"]])


@pytest.mark.parametrize("v", VECTORS["tx_protocol"] + VECTORS["sync_protocol"], ids=lambda v: v["name"])
def test_message_bytes(v: dict[str, Any]) -> None:
    body = _encode(v)
    assert body.hex() == v["hex"]
    assert (encode_uvarint(len(body)) + body).hex() == v["frame"]


class _Stream:
    """Just enough of an INetStream for read_frame: bytes handed out in small pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        chunk, self.data = self.data[: min(n, 7)], self.data[min(n, 7) :]
        return chunk


@pytest.mark.parametrize("v", VECTORS["tx_protocol"] + VECTORS["sync_protocol"], ids=lambda v: v["name"])
def test_frame_reads_back(v: dict[str, Any]) -> None:
    async def main() -> bytes:
        return await read_frame(_Stream(_hex(v["frame"])), m.MAX_SYNC_REPLY)  # type: ignore[arg-type]

    assert trio.run(main).hex() == v["hex"]


def test_tx_requests_decode() -> None:
    submit = m.decode_tx_request(_hex(TX_MESSAGES["submit"]["hex"]))
    assert submit == m.Submit(_hex(VECTORS["tx"]["hex"]))
    wait = m.decode_tx_request(_hex(TX_MESSAGES["wait"]["hex"]))
    assert wait == m.Wait(_hex(VECTORS["tx"]["hash"]), 5000)
    many = m.decode_tx_request(_hex(TX_MESSAGES["submit_many"]["hex"]))
    assert many == m.SubmitMany((_hex(VECTORS["tx"]["hex"]),) * 2)
    codes = m.decode_submit_many_reply(_hex(TX_MESSAGES["submit_many_ok"]["hex"]), 2)
    assert codes == [None, "duplicate"]


def test_tx_replies_decode() -> None:
    digest = _hex(VECTORS["tx"]["hash"])
    assert m.decode_submit_reply(_hex(TX_MESSAGES["submit_ok"]["hex"])) == digest
    f = TX_MESSAGES["submit_error_bad_nonce"]["fields"]
    assert m.decode_submit_reply(_hex(TX_MESSAGES["submit_error_bad_nonce"]["hex"])) == m.ErrorReply(
        f["code"], f["message"]
    )
    assert f["code"] == errors.BadNonce.code
    assert str(errors.BadNonce(_hex(LEDGER["blocks"]["block"]["txs"][0]["fields"]["sender"]), 1, 0)) == f["message"]
    committed = TX_MESSAGES["wait_committed"]["fields"]
    assert m.decode_wait_reply(_hex(TX_MESSAGES["wait_committed"]["hex"])) == (
        digest,
        committed["height"],
        _hex(committed["block_hash"]),
    )
    f = TX_MESSAGES["wait_error_not_found"]["fields"]
    assert m.decode_wait_reply(_hex(TX_MESSAGES["wait_error_not_found"]["hex"])) == m.ErrorReply(
        f["code"], f["message"]
    )


def test_sync_messages_decode() -> None:
    assert m.decode_sync_request(_hex(SYNC_MESSAGES["get_blocks"]["hex"])) == m.GetBlocks(1, 64, 10000)
    tip, blocks = m.decode_blocks_reply(_hex(SYNC_MESSAGES["blocks"]["hex"]))  # type: ignore[misc]
    assert tip == 1 and len(blocks) == 1
    block, cert = blocks[0]
    assert block.hex() == LEDGER["blocks"]["block"]["hex"] and decode_block(block)[0].height == 1
    assert cert.hex() == LEDGER["blocks"]["certificates"][0]["hex"] and decode_certificate(cert)
    assert m.decode_blocks_reply(_hex(SYNC_MESSAGES["blocks_empty"]["hex"])) == (1, [])
    assert m.decode_blocks_reply(_hex(SYNC_MESSAGES["get_blocks_error_bad_request"]["hex"])) == m.ErrorReply(
        "bad_request", "heights start at 1"
    )


@pytest.mark.parametrize("v", VECTORS["invalid_tx_requests"], ids=lambda v: v["name"])
def test_invalid_tx_request(v: dict[str, str]) -> None:
    with pytest.raises(m.MessageError):
        m.decode_tx_request(_hex(v["hex"]))


@pytest.mark.parametrize("v", VECTORS["invalid_sync_requests"], ids=lambda v: v["name"])
def test_invalid_sync_request(v: dict[str, str]) -> None:
    with pytest.raises(m.MessageError):
        m.decode_sync_request(_hex(v["hex"]))


def _documented_codes(doc: str) -> set[str]:
    text = (ROOT / "protocols" / doc).read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))


def test_every_ledger_error_code_is_documented() -> None:
    """tx.md has a row for every ledger `code`; control.md for every one a client can see."""
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.LedgerError) and cls.__module__ == errors.__name__
    ]
    missing = ({cls.code for cls in classes} | {"timeout", "not_found"}) - _documented_codes("tx.md")
    assert not missing, f"tx.md has no row for {sorted(missing)}"
    refusals = {
        cls.code
        for cls in classes
        if issubclass(cls, errors.TxRejected | errors.LedgerDecodeError) and cls is not errors.TxRejected
    }
    missing = (refusals | {"timeout", "not_found", "corrupt"}) - _documented_codes("control.md")
    assert not missing, f"control.md has no row for {sorted(missing)}"


def test_vector_file_is_up_to_date() -> None:
    script = ROOT / "scripts" / "gen_tx_vectors.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
