import os
import stat
import time

import pytest

from rccs.auth import TokenAuthority, TokenError, load_or_create_secret, parse_duration


def test_issue_and_verify_round_trip():
    authority = TokenAuthority(b"k" * 32)
    identity = authority.verify(authority.issue("alice", "alice-phone", 60))
    assert (identity.user, identity.device) == ("alice", "alice-phone")
    assert identity.expires_at >= int(time.time()) + 59


@pytest.mark.parametrize("token", ["", None, 5, "a.b.c"])
def test_garbage_is_refused(token):
    with pytest.raises(TokenError):
        TokenAuthority(b"k" * 32).verify(token)


def test_expired_and_forged_are_refused():
    authority = TokenAuthority(b"k" * 32)
    with pytest.raises(TokenError, match="expired"):
        authority.verify(authority.issue("alice", "d", 60, now=time.time() - 120))
    forged = TokenAuthority(b"x" * 32).issue("alice", "d", 60)
    with pytest.raises(TokenError, match="invalid"):
        authority.verify(forged)


def test_a_remembered_token_is_still_refused_once_it_expires(monkeypatch):
    authority = TokenAuthority(b"k" * 32)
    token = authority.issue("alice", "alice-phone", 60)
    first = authority.verify(token)
    assert authority.verify(token) == first and authority.remembered == 1  # answered from memory
    # Past its exp (PyJWT's rule: expired once exp <= now), memory does not make it valid.
    monkeypatch.setattr("rccs.auth.time.time", lambda: float(first.expires_at))
    with pytest.raises(TokenError, match="expired"):
        authority.verify(token)
    assert authority.remembered == 0


def test_only_tokens_that_verified_are_remembered_and_at_most_so_many():
    authority = TokenAuthority(b"k" * 32, verified_tokens=3)
    forged = TokenAuthority(b"x" * 32).issue("alice", "d", 60)
    for _ in range(2):  # refused every time, never remembered
        with pytest.raises(TokenError, match="invalid"):
            authority.verify(forged)
    assert authority.remembered == 0
    tokens = [authority.issue("alice", f"d{n}", 60) for n in range(5)]
    for token in tokens:
        authority.verify(token)
    assert authority.remembered == 3
    assert [authority.verify(token).device for token in tokens] == [f"d{n}" for n in range(5)]  # all still valid


@pytest.mark.parametrize(("user", "device"), [("", "d"), ("a b", "d"), ("a", "x" * 129), ("a", "d/evil")])
def test_invalid_ids_cannot_be_issued(user, device):
    with pytest.raises(ValueError, match="invalid"):
        TokenAuthority(b"k" * 32).issue(user, device, 60)


def test_secret_is_created_once_with_private_mode(tmp_path):
    first = load_or_create_secret(str(tmp_path / "data"))
    second = load_or_create_secret(str(tmp_path / "data"))
    assert first == second and len(first) == 64
    mode = stat.S_IMODE(os.stat(tmp_path / "data" / "token.key").st_mode)
    assert mode == 0o600


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)
