"""API keys: the keys file, a malformed key list, and owners (without a server: see tests/e2e/test_trust.py)."""

from __future__ import annotations

import pytest

from fastdeploy.errors import SettingsError, Unauthorized
from fastdeploy.http.auth import ApiKeys, read_keys_file


def scope(headers: list[tuple[bytes, bytes]], client: tuple[str, int] = ("10.1.2.3", 5000)) -> dict:
    return {"headers": headers, "client": client}


def test_keys_file_comments_need_a_space_before_them(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# the team\nabc#def\nplain  # rotated in May\n\n  spaced\t# tab\n")
    assert read_keys_file(str(path)) == ["abc#def", "plain", "spaced"]


def test_a_key_list_that_holds_no_key_refuses_to_run_open():
    with pytest.raises(SettingsError, match="holds no key"):
        ApiKeys(" , ,")


def test_owners_are_key_digests_or_client_addresses():
    keys = ApiKeys("first-key-0123456789,second-key-0123456789")
    owner = keys.owner(scope([(b"authorization", b"Bearer first-key-0123456789")]))
    assert owner.startswith("key:") and "first" not in owner
    assert keys.owner(scope([(b"x-api-key", b"first-key-0123456789")])) == owner
    assert keys.owner(scope([(b"x-api-key", b"second-key-0123456789")])) != owner
    with pytest.raises(Unauthorized, match="needs an API key"):
        keys.owner(scope([]))
    with pytest.raises(Unauthorized, match="not valid") as refused:
        keys.owner(scope([(b"authorization", b"Bearer nope")]))
    assert refused.value.headers()["WWW-Authenticate"].startswith("Bearer")
    assert ApiKeys().owner(scope([])) == "addr:10.1.2.3"
