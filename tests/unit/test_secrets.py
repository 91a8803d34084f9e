"""CHAP secrets sealed at rest."""

import pytest
from cryptography.fernet import Fernet

from app.secrets import SEALED, SecretBox, SecretKeyError


@pytest.mark.parametrize("key", [Fernet.generate_key().decode(), "a long operator passphrase"])
def test_seal_and_open_round_trip(key: str) -> None:
    box = SecretBox(key)
    sealed = box.seal("s3cretCHAPpass16")
    assert sealed.startswith(SEALED)
    assert "s3cretCHAPpass16" not in sealed
    assert box.open(sealed) == "s3cretCHAPpass16"
    assert box.seal(sealed) == sealed  # sealing twice is a no-op


def test_plain_secrets_pass_through_both_ways() -> None:
    assert SecretBox(None).seal("plain") == "plain"
    assert SecretBox("k" * 40).open("plain") == "plain"  # rows written before the key was set


def test_wrong_or_missing_key_is_a_clear_error() -> None:
    sealed = SecretBox("first key of the operator").seal("x")
    with pytest.raises(SecretKeyError, match="another TETHER_SECRET_KEY"):
        SecretBox("second key of the operator").open(sealed)
    with pytest.raises(SecretKeyError, match="not set"):
        SecretBox(None).open(sealed)
