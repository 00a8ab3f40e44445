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


def _bearer(key: str) -> dict:
    return scope([(b"authorization", f"Bearer {key}".encode())])


def test_a_reload_puts_in_force_exactly_what_the_file_holds_now(tmp_path):
    path = tmp_path / "keys"
    path.write_text("file-key-0123456789\n")
    keys = ApiKeys(path=str(path))
    assert keys.owner(_bearer("file-key-0123456789")) and keys.warnings() == []
    path.write_text("# nothing left\n")
    keys.reload()
    with pytest.raises(Unauthorized, match="accepts no API key at the moment"):  # the last key revoked
        keys.owner(_bearer("file-key-0123456789"))
    assert "holds no key" in keys.warnings()[0] and str(tmp_path) not in keys.warnings()[0]
    path.unlink()
    keys.reload()
    assert "is missing" in keys.warnings()[0]
    path.write_text("new-key-0123456789\n")
    keys.reload()
    assert keys.owner(_bearer("new-key-0123456789")) and keys.warnings() == []


def test_inline_keys_stay_when_the_file_is_gone(tmp_path):
    path = tmp_path / "keys"
    path.write_text("file-key-0123456789\n")
    keys = ApiKeys("inline-key-0123456789", str(path))
    path.unlink()
    keys.reload()
    assert keys.owner(_bearer("inline-key-0123456789"))
    with pytest.raises(Unauthorized, match="not valid"):
        keys.owner(_bearer("file-key-0123456789"))
    assert "still accepted" in keys.warnings()[0]


def test_an_empty_file_stops_the_start_but_not_an_api_server_started_later(tmp_path):
    path = tmp_path / "keys"
    path.write_text("")
    with pytest.raises(SettingsError, match="none is configured"):
        ApiKeys(path=str(path))
    later = ApiKeys(path=str(path), strict=False)  # a restart after the keys were revoked
    assert later.enabled and later.warnings()
    with pytest.raises(Unauthorized, match="accepts no API key"):
        later.owner(_bearer("any-key-0123456789"))
