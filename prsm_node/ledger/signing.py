"""Ed25519 signing and verification of transactions and receipts (pynacl).

Ed25519 (RFC 8032) signatures are deterministic, so the same key and tx always give the same
bytes (the test vectors rely on it). libsodium rejects non-canonical ``S`` values, so nobody
but the signer can derive a second valid signature from a valid one; the signer can (with
another nonce), so a tx hash is not unique per (sender, nonce). Verification costs ~100 us.
"""

from __future__ import annotations

import dataclasses

import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_sign_open

from .codec import receipt_signing_payload, signing_payload
from .types import Body, Receipt, Tx


def sign_tx(key: nacl.signing.SigningKey, *, chain_id: str, nonce: int, fee: int, body: Body) -> Tx:
    """Build and sign a tx whose sender is ``key``'s public key."""
    unsigned = Tx(chain_id=chain_id, sender=bytes(key.verify_key), nonce=nonce, fee=fee, body=body)
    return dataclasses.replace(unsigned, signature=key.sign(signing_payload(unsigned)).signature)


def sign_receipt(
    key: nacl.signing.SigningKey, *, receipt_id: bytes, payee: bytes, amount: int, chain_id: str
) -> Receipt:
    """Build and sign a receipt whose payer is ``key``'s public key."""
    unsigned = Receipt(
        receipt_id=receipt_id, payer=bytes(key.verify_key), payee=payee, amount=amount, chain_id=chain_id
    )
    return dataclasses.replace(unsigned, signature=key.sign(receipt_signing_payload(unsigned)).signature)


def _verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    # libsodium's crypto_sign_open directly: VerifyKey's Python wrapper holds the GIL for as
    # long as the check itself runs without it, which halves verification on a worker thread.
    # The binding does not check lengths, so they are checked here.
    if type(public_key) is not bytes or len(public_key) != 32:
        return False
    if type(signature) is not bytes or len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


def verify_tx_signature(tx: Tx) -> bool:
    """True when ``tx.signature`` is the sender's signature over ``signing_payload(tx)``."""
    return _verify(tx.sender, signing_payload(tx), tx.signature)


def verify_receipt_signature(r: Receipt) -> bool:
    """True when ``r.signature`` is the payer's signature over ``receipt_signing_payload(r)``."""
    return _verify(r.payer, receipt_signing_payload(r), r.signature)
