"""Stage payloads are signed: nothing a store holds is unpickled unless this service wrote it.

The envelope (``jobs.encode_stage_outputs`` / ``jobs.decode_payload``) and the store secret
(``store_secret``: the setting, the generated file of the embedded store, the check that a
chain on a broker has one).
"""

from __future__ import annotations

import hashlib
import hmac
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
    JOB_NOT_SIGNED_REASON,
    NOT_SIGNED_REASON,
    Binding,
    UntrustedPayload,
    decode_payload,
    encode_inputs,
    encode_stage_outputs,
    is_job_id,
    sign_job,
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
JOB = "0190a1b2c3d4e5f60718293a4b5c6d7e"


def at(stage: int, job_id: str = JOB, owner: str = "key:a", n_items: int = 1) -> Binding:
    return Binding(job_id, stage, owner, n_items)


@pytest.mark.parametrize("outputs, keys", [
    ([(1, {2})], None),
    ([{"a": [1.5, None]}, b"\x00bytes", "text"], None),
    ([["a.png", 3]], ["a.png"]),
    ([], None),
])
def test_round_trip(outputs, keys):
    payload = encode_stage_outputs(outputs, keys, SECRET, at(1, n_items=len(outputs)))
    assert payload[:2] == b"S2"
    assert decode_payload(payload, SECRET, at(1, n_items=len(outputs))) == (outputs, keys)
    payload = encode_stage_outputs(outputs, keys, SECRET, at(7, n_items=len(outputs)))
    assert decode_payload(payload, SECRET, at(7, n_items=len(outputs))) == (outputs, keys)


def test_str_and_bytes_secrets_are_the_same_key():
    payload = encode_stage_outputs([1], None, SECRET, at(1))
    assert decode_payload(payload, SECRET.encode(), at(1)) == ([1], None)


def test_every_tampered_byte_is_refused(no_unpickling):
    payload = encode_stage_outputs([{"x": 1}], ["k"], SECRET, at(1))
    for i in range(len(payload)):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(UntrustedPayload):
            decode_payload(bytes(tampered), SECRET, at(1))


def test_appended_or_truncated_bytes_are_refused(no_unpickling):
    payload = encode_stage_outputs([1, 2], None, SECRET, at(1, n_items=2))
    for bad in (payload + b"\x00", payload[:-1], payload[:34], payload[:2], b""):
        with pytest.raises(UntrustedPayload):
            decode_payload(bad, SECRET, at(1, n_items=2))


def test_a_payload_is_bound_to_its_job_stage_owner_and_item_count(no_unpickling):
    """A Redis writer cannot move a signed payload onto another job, stage, owner or size."""
    payload = encode_stage_outputs([1], None, SECRET, at(1))
    for other in (at(1, job_id="0190a1b2c3d4e5f60718293a4b5c6d7f"), at(2), at(1, owner="key:b"), at(1, n_items=2)):
        with pytest.raises(UntrustedPayload) as info:
            decode_payload(payload, SECRET, other)
        assert str(info.value) == NOT_SIGNED_REASON


def test_the_previous_unbound_format_is_refused(no_unpickling):
    """``S1`` payloads (signed before they named their job) could be replayed onto any job."""
    body = pickle.dumps({"i": [1], "k": None})
    mac = hmac.new(SECRET.encode(), b"S1", hashlib.sha256)
    mac.update(body)
    with pytest.raises(UntrustedPayload):
        decode_payload(b"S1" + mac.digest() + body, SECRET, at(1))


def test_wrong_secret_is_refused_with_the_reason(no_unpickling):
    payload = encode_stage_outputs([1], None, OTHER, at(1))
    with pytest.raises(UntrustedPayload) as info:
        decode_payload(payload, SECRET, at(1))
    assert str(info.value) == NOT_SIGNED_REASON
    assert "--store-secret" in str(info.value)


def test_missing_mac_is_refused(no_unpickling):
    body = pickle.dumps({"i": [1], "k": None})
    for bad in (b"S2" + body, b"S2" + b"\x00" * 32 + body, body):
        with pytest.raises(UntrustedPayload):
            decode_payload(bad, SECRET, at(1))


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
            decode_payload(old, SECRET, at(stage))
    assert not pwned.exists()


def test_a_malicious_pickle_signed_with_another_secret_never_runs(tmp_path):
    pwned = tmp_path / "pwned"
    forged = encode_stage_outputs([Touch(pwned)], None, OTHER, at(1))
    assert not pwned.exists()  # pickling does not run it
    with pytest.raises(UntrustedPayload):
        decode_payload(forged, SECRET, at(1))
    assert not pwned.exists()


def test_stage_0_takes_msgpack_only(no_unpickling):
    assert decode_payload(encode_inputs([1, "a"], None), "", at(0, n_items=2)) == ([1, "a"], None)
    assert decode_payload(encode_inputs([["a.png", b"\x00"]], ["a.png"]), "", at(0)) == ([["a.png", b"\x00"]], ["a.png"])
    signed = encode_stage_outputs([1], None, SECRET, at(0))
    for pickled in (signed, b"P" + pickle.dumps({"i": [1], "k": None})):
        for secret in (SECRET, ""):
            with pytest.raises(UntrustedPayload, match="stage 0"):
                decode_payload(pickled, secret, at(0))  # even one this service signed
    with pytest.raises(ValueError):
        decode_payload(msgpack.packb([1, 2]), "", at(0))  # msgpack, but not a job's inputs


def test_with_a_secret_stage_0_takes_only_job_records_signed_for_that_job(no_unpickling):
    inputs = encode_inputs([1, "a"], None)
    signed = sign_job(inputs, at(0, n_items=2), SECRET)
    assert signed[:2] == b"J1"
    assert decode_payload(signed, SECRET, at(0, n_items=2)) == ([1, "a"], None)
    for other in (at(0, job_id="/etc", n_items=2), at(0, owner="", n_items=2), at(0, n_items=3), at(1, n_items=2)):
        with pytest.raises(UntrustedPayload):
            decode_payload(signed, SECRET, other)
    with pytest.raises(UntrustedPayload) as info:
        decode_payload(inputs, SECRET, at(0, n_items=2))  # unsigned: written by someone without the secret
    assert str(info.value) == JOB_NOT_SIGNED_REASON
    with pytest.raises(UntrustedPayload, match="same --store-secret"):
        decode_payload(signed, "", at(0, n_items=2))  # this worker has no secret: it cannot check it
    with pytest.raises(UntrustedPayload) as info:
        decode_payload(sign_job(inputs, at(0, n_items=2), OTHER), SECRET, at(0, n_items=2))
    assert str(info.value) == JOB_NOT_SIGNED_REASON
    tampered = bytearray(signed)
    tampered[-1] ^= 1
    with pytest.raises(UntrustedPayload):
        decode_payload(bytes(tampered), SECRET, at(0, n_items=2))


def test_later_stages_refuse_msgpack(no_unpickling):
    with pytest.raises(UntrustedPayload):
        decode_payload(encode_inputs([1], None), SECRET, at(1))
    with pytest.raises(UntrustedPayload):
        decode_payload(sign_job(encode_inputs([1], None), at(1), SECRET), SECRET, at(1))


def test_no_secret_signs_nothing_and_accepts_nothing(no_unpickling):
    with pytest.raises(UntrustedPayload, match="--store-secret"):
        encode_stage_outputs([1], None, "", at(1))
    with pytest.raises(UntrustedPayload, match="--store-secret"):
        sign_job(encode_inputs([1], None), at(0), "")
    signed = encode_stage_outputs([1], None, SECRET, at(1))
    with pytest.raises(UntrustedPayload, match="--store-secret"):
        decode_payload(signed, "", at(1))


@pytest.mark.parametrize("job_id, ok", [
    ("0190a1b2c3d4e5f60718293a4b5c6d7e", True), ("a", True), (".", True), ("..", True), ("a:b-c_d.e", True),
    ("x" * 128, True), ("x" * 129, False), ("", False), ("/etc", False), ("a/b", False), ("../x", False),
    ("a\nb", False), ("a b", False), ("é", False), ("a\x00", False), (None, False), (b"abc", False), (7, False),
])
def test_the_job_id_grammar(job_id, ok):
    assert is_job_id(job_id) is ok


def test_signing_depends_on_a_broker_and_a_given_secret(tmp_path):
    assert store_secret.for_jobs(_settings(tmp_path)) == ""
    assert store_secret.for_jobs(_settings(tmp_path, store_secret=SECRET)) == ""  # embedded: the file is beside it
    assert store_secret.for_jobs(_settings(tmp_path, broker="redis://127.0.0.1:6379/0")) == ""
    assert store_secret.for_jobs(_settings(tmp_path, broker="redis://127.0.0.1:6379/0", store_secret=SECRET)) == SECRET


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


# -- payloads of an earlier version, signed again at an upgrade ------------------------------
def test_an_earlier_versions_stage_payload_is_signed_for_its_job_only_if_its_old_mac_verifies(no_unpickling):
    from tests.old_redis_layout import legacy_stage_payload

    legacy = legacy_stage_payload([1, 2], SECRET)
    upgraded = jobs.upgraded_payload(legacy, at(1, n_items=2), SECRET, "")
    assert upgraded is not None and upgraded[:2] == b"S2"
    with pytest.raises(AssertionError, match="pickle.loads was called"):  # verified: it reached the unpickling
        decode_payload(upgraded, SECRET, at(1, n_items=2))
    assert jobs.upgraded_payload(legacy_stage_payload([1], OTHER), at(1), SECRET, "") is None  # not ours
    assert jobs.upgraded_payload(upgraded, at(1, n_items=2), SECRET, "") is None  # already this version's
    assert jobs.upgraded_payload(legacy, at(1, n_items=2), "", "") is None  # nothing to vouch with


def test_an_earlier_versions_stage_0_record_is_signed_only_where_api_servers_sign():
    inputs = encode_inputs([1, "a"], None)
    assert jobs.upgraded_payload(inputs, at(0, n_items=2), SECRET, "") is None  # embedded: never signed
    signed = jobs.upgraded_payload(inputs, at(0, n_items=2), SECRET, SECRET)
    assert signed is not None and decode_payload(signed, SECRET, at(0, n_items=2)) == ([1, "a"], None)
    assert jobs.upgraded_payload(signed, at(0, n_items=2), SECRET, SECRET) is None
    assert jobs.upgraded_payload(b"P" + pickle.dumps([1]), at(0), SECRET, SECRET) is None
