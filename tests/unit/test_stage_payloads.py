"""Stage payloads are signed: nothing a store holds is unpickled unless this service wrote it.

The envelope (``jobs.encode_stage_outputs`` / ``jobs.decode_payload``) and the store secret
(``store_secret``: the setting, the generated file of the embedded store, the check that a
chain on a broker has one).
"""

from __future__ import annotations

import os
import pickle
import stat
import threading
from pathlib import Path

import msgpack
import pytest

from fastdeploy import jobs, store_secret
from fastdeploy.errors import SettingsError
from fastdeploy.jobs import (
    NOT_SIGNED_REASON,
    UntrustedPayload,
    decode_payload,
    encode_inputs,
    encode_stage_outputs,
)
from fastdeploy.recipe import load_recipe
from fastdeploy.settings import load_settings
from tests.helpers import RECIPES, TEST_RECIPES

SECRET = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4


class Touch:
    """A pickle that runs code when loaded: creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if the decoder calls pickle.loads at all."""
    def refuse(*_a, **_k):
        raise AssertionError("pickle.loads was called on a payload that should have been refused")

    monkeypatch.setattr(jobs.pickle, "loads", refuse)


# -- the envelope ------------------------------------------------------------------
@pytest.mark.parametrize("outputs, keys", [
    ([(1, {2})], None),
    ([{"a": [1.5, None]}, b"\x00bytes", "text"], None),
    ([["a.png", 3]], ["a.png"]),
    ([], None),
])
def test_round_trip(outputs, keys):
    payload = encode_stage_outputs(outputs, keys, SECRET)
    assert payload[:2] == b"S1"
    assert decode_payload(payload, SECRET, 1) == (outputs, keys)
    assert decode_payload(payload, SECRET, 7) == (outputs, keys)  # any later stage


def test_str_and_bytes_secrets_are_the_same_key():
    payload = encode_stage_outputs([1], None, SECRET)
    assert decode_payload(payload, SECRET.encode(), 1) == ([1], None)


def test_every_tampered_byte_is_refused(no_unpickling):
    payload = encode_stage_outputs([{"x": 1}], ["k"], SECRET)
    for i in range(len(payload)):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(UntrustedPayload):
            decode_payload(bytes(tampered), SECRET, 1)


def test_appended_or_truncated_bytes_are_refused(no_unpickling):
    payload = encode_stage_outputs([1, 2], None, SECRET)
    for bad in (payload + b"\x00", payload[:-1], payload[:34], payload[:2], b""):
        with pytest.raises(UntrustedPayload):
            decode_payload(bad, SECRET, 1)


def test_wrong_secret_is_refused_with_the_reason(no_unpickling):
    payload = encode_stage_outputs([1], None, OTHER)
    with pytest.raises(UntrustedPayload) as info:
        decode_payload(payload, SECRET, 1)
    assert str(info.value) == NOT_SIGNED_REASON
    assert "--store-secret" in str(info.value)


def test_missing_mac_is_refused(no_unpickling):
    body = pickle.dumps({"i": [1], "k": None})
    for bad in (b"S1" + body, b"S1" + b"\x00" * 32 + body, body):
        with pytest.raises(UntrustedPayload):
            decode_payload(bad, SECRET, 1)


def test_the_malicious_pickle_of_these_tests_does_run_when_loaded(tmp_path):
    """The control: what the tests below refuse would have created the file."""
    pwned = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Touch(pwned)))
    assert pwned.exists()


def test_the_old_unsigned_pickle_format_is_refused_and_never_loaded(tmp_path, no_unpickling):
    pwned = tmp_path / "pwned"
    old = b"P" + pickle.dumps({"i": [Touch(pwned)], "k": None})
    for stage in (0, 1, 2):
        with pytest.raises(UntrustedPayload):
            decode_payload(old, SECRET, stage)
    assert not pwned.exists()


def test_a_malicious_pickle_signed_with_another_secret_never_runs(tmp_path):
    pwned = tmp_path / "pwned"
    forged = encode_stage_outputs([Touch(pwned)], None, OTHER)
    assert not pwned.exists()  # pickling does not run it
    with pytest.raises(UntrustedPayload):
        decode_payload(forged, SECRET, 1)
    assert not pwned.exists()


def test_stage_0_takes_msgpack_only(no_unpickling):
    assert decode_payload(encode_inputs([1, "a"], None), SECRET, 0) == ([1, "a"], None)
    assert decode_payload(encode_inputs([["a.png", b"\x00"]], ["a.png"]), "", 0) == ([["a.png", b"\x00"]], ["a.png"])
    signed = encode_stage_outputs([1], None, SECRET)
    for pickled in (signed, b"P" + pickle.dumps({"i": [1], "k": None})):
        with pytest.raises(UntrustedPayload, match="stage 0"):
            decode_payload(pickled, SECRET, 0)  # even one this service signed
    with pytest.raises(ValueError):
        decode_payload(msgpack.packb([1, 2]), SECRET, 0)  # msgpack, but not a job's inputs


def test_later_stages_refuse_msgpack(no_unpickling):
    with pytest.raises(UntrustedPayload):
        decode_payload(encode_inputs([1], None), SECRET, 1)


def test_no_secret_signs_nothing_and_accepts_nothing(no_unpickling):
    with pytest.raises(UntrustedPayload, match="--store-secret"):
        encode_stage_outputs([1], None, "")
    signed = encode_stage_outputs([1], None, SECRET)
    with pytest.raises(UntrustedPayload, match="--store-secret"):
        decode_payload(signed, "", 1)


# -- the setting ---------------------------------------------------------------------
def test_the_setting_reaches_children_but_never_a_repr(tmp_path):
    settings = load_settings(tmp_path, environ={"FASTDEPLOY_STORE_SECRET": SECRET})
    assert settings.store_secret == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    env = settings.to_env()
    assert env["FASTDEPLOY_STORE_SECRET"] == SECRET
    assert load_settings(tmp_path, environ=env) == settings
    assert load_settings(tmp_path, {"store_secret": OTHER}, environ=env).store_secret == OTHER


# -- the secret a service uses ---------------------------------------------------------
CHAIN = load_recipe(TEST_RECIPES / "chain")
ONE_STAGE = load_recipe(RECIPES / "echo")


def _settings(tmp_path, **flags):
    return load_settings(tmp_path, {"state_dir": str(tmp_path / "state"), **flags}, environ={})


def test_a_chain_on_a_broker_needs_a_secret(tmp_path):
    settings = _settings(tmp_path, broker="redis://127.0.0.1:6379/0")
    with pytest.raises(SettingsError) as info:
        store_secret.resolve(settings, CHAIN)
    reason = info.value.reason
    assert "--store-secret" in reason and "FASTDEPLOY_STORE_SECRET" in reason and "\n" not in reason
    assert not (tmp_path / "state").exists()  # nothing generated for a broker


def test_one_stage_recipes_need_no_secret(tmp_path):
    for broker in ("", "redis://127.0.0.1:6379/0"):
        settings = _settings(tmp_path, broker=broker)
        assert store_secret.resolve(settings, ONE_STAGE) is settings
    assert not (tmp_path / "state" / "store_secret").exists()


def test_a_given_secret_is_used_as_is_and_short_ones_are_refused(tmp_path):
    settings = _settings(tmp_path, broker="redis://127.0.0.1:6379/0", store_secret=SECRET)
    assert store_secret.resolve(settings, CHAIN).store_secret == SECRET
    embedded = _settings(tmp_path, store_secret=SECRET)
    assert store_secret.resolve(embedded, CHAIN).store_secret == SECRET
    assert not (tmp_path / "state" / "store_secret").exists()
    with pytest.raises(SettingsError, match="--store-secret"):
        store_secret.resolve(_settings(tmp_path, store_secret="short"), CHAIN)


def test_the_embedded_store_generates_a_private_secret_once_and_reuses_it(tmp_path):
    settings = _settings(tmp_path)
    first = store_secret.resolve(settings, CHAIN).store_secret
    path = tmp_path / "state" / "store_secret"
    assert len(first) == 64 and int(first, 16) >= 0  # 32 random bytes, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first
    assert store_secret.resolve(settings, CHAIN).store_secret == first  # a restart reuses it
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".gitignore", "store_secret"]  # no temp files
    other = _settings(tmp_path / "elsewhere")
    assert store_secret.resolve(other, CHAIN).store_secret != first


def test_a_loosened_secret_file_is_made_private_again(tmp_path):
    settings = _settings(tmp_path)
    secret = store_secret.resolve(settings, CHAIN).store_secret
    path = tmp_path / "state" / "store_secret"
    path.chmod(0o644)
    assert store_secret.resolve(settings, CHAIN).store_secret == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_empty_secret_file_is_an_error_not_an_empty_key(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "store_secret").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        store_secret.resolve(_settings(tmp_path), CHAIN)


def test_processes_starting_together_agree_on_one_secret(tmp_path):
    state = tmp_path / "state"
    found: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        found.append(store_secret.load_or_create(state))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert sorted(p.name for p in state.iterdir()) == [".gitignore", "store_secret"]


def test_a_loop_without_a_given_secret_uses_the_state_folders_own(tmp_path):
    settings = _settings(tmp_path)
    assert store_secret.for_loop(settings) == store_secret.resolve(settings, CHAIN).store_secret
    on_broker = _settings(tmp_path, broker="redis://127.0.0.1:6379/0")
    assert store_secret.for_loop(on_broker) == ""  # refuses every stage payload
    given = _settings(tmp_path, store_secret=SECRET)
    assert store_secret.for_loop(given) == SECRET
