"""CHAP secrets at rest: sealed with Fernet when TETHER_SECRET_KEY is set, plain text otherwise."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

SEALED = "fernet:"


class SecretKeyError(ValueError):
    """A sealed secret cannot be opened: no key, or not the key it was sealed with."""


def _fernet(key: str) -> Fernet:
    try:
        return Fernet(key.encode())
    except ValueError:
        # not a Fernet key: treat it as a passphrase and derive one, so operators may use any long string
        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


class SecretBox:
    def __init__(self, key: str | None) -> None:
        self._fernet = _fernet(key) if key else None

    @property
    def sealing(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None or secret.startswith(SEALED):
            return secret
        return SEALED + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(SEALED):
            return stored
        if self._fernet is None:
            raise SecretKeyError("a CHAP secret is sealed but TETHER_SECRET_KEY is not set")
        try:
            return self._fernet.decrypt(stored[len(SEALED) :].encode()).decode()
        except InvalidToken:
            raise SecretKeyError("a CHAP secret was sealed with another TETHER_SECRET_KEY") from None
