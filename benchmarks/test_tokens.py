"""Micro-benchmark of the token check a hello makes, side by side in one run: PyJWT's verification of a
token seen for the first time, and the same token presented again (a reconnect), answered from the
verdicts ``TokenAuthority`` remembers. Run with ``make bench-micro``."""

import pytest

from rccs.auth import TokenAuthority

SECRET = b"k" * 32


@pytest.mark.benchmark(group="token_verify")
def test_token_verify_first_time_pyjwt(benchmark):
    authority = TokenAuthority(SECRET, verified_tokens=0)  # nothing remembered: PyJWT every time
    token = authority.issue("alice", "alice-phone", 3600)
    assert benchmark(authority.verify, token).device == "alice-phone"


@pytest.mark.benchmark(group="token_verify")
def test_token_verify_again_remembered(benchmark):
    authority = TokenAuthority(SECRET)
    token = authority.issue("alice", "alice-phone", 3600)
    authority.verify(token)
    assert benchmark(authority.verify, token).device == "alice-phone"
