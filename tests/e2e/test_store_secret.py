"""Nothing from the store runs code: stage payloads are signed with the store secret.

Through the real CLI: a job whose stage payload someone wrote straight into the store (a
pickle that would `touch` a file) fails with a reason and runs nothing, on Redis and on the
embedded store, while normal chain jobs still succeed; a chain on a broker does not start
without --store-secret; the embedded store generates its secret once (0600) and reuses it,
and the secret reaches the loops through their environment, never a command line or a log.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from fastdeploy.jobs import NOT_SIGNED_REASON, Binding, Outcome, encode_stage_outputs
from fastdeploy.store import open_store
from tests.helpers import ROOT, TEST_RECIPES, Server, serve

CHAIN = TEST_RECIPES / "chain"
SECRET = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4
REFUSED = f"could not prepare the inputs: {NOT_SIGNED_REASON}"

pytestmark = pytest.mark.timeout(300)


class Touch:
    """Runs `touch PATH` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def old_format(pwned: Path) -> bytes:
    """What stages wrote before payloads were signed: b"P" + pickle."""
    return b"P" + pickle.dumps({"i": [Touch(pwned)], "k": None})


def forged(pwned: Path, job_id: str) -> bytes:
    """The signed format, signed with a key that is not this service's."""
    return encode_stage_outputs([Touch(pwned)], None, OTHER, Binding(job_id, 1, "127.0.0.1", 1))


def assert_chain_works(server: Server, data: list[int]) -> None:
    answer = server.post("/sync", {"data": data})
    assert answer.status_code == 200, answer.text
    assert [(p["input"], p["double"]) for p in answer.json()["prediction"]] == [(x, 2 * x) for x in data]


def assert_failed(server: Server, unique_id: str, reason: str) -> None:
    body = server.wait_result(unique_id, timeout=60)
    assert body["status"] == "failed" and body["success"] is False, body
    assert body["reason"] == reason, body


def loop_processes(server: Server) -> list[int]:
    return [pid for pid in server.children() if b"_loop" in Path(f"/proc/{pid}/cmdline").read_bytes()]


# -- a payload someone else wrote, on both stores -------------------------------------------
def ready_stages(server: Server) -> set[int]:
    try:
        meta = server.get("/meta").json()
    except requests.RequestException:
        return set()
    return {s["stage"] for s in meta["stages"] for w in s["workers"] if w["ready"]}


def wait_for(check, timeout: float, what: str, *servers: Server):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.proc.args} (exit {s.proc.poll()}):\n{s.log()[-3000:]}" for s in servers)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
        time.sleep(0.1)
    return value


def overwrite_redis_payload(redis_url: str, job_id: str, payload: bytes) -> None:
    """HSET a queued job's payload in Redis, as anyone who can reach an unprotected Redis could."""
    import redis

    from fastdeploy.store.redis import Keys, _split_url

    url, prefix = _split_url(redis_url)
    client = redis.Redis.from_url(url)
    try:
        assert client.hset(Keys(prefix).job(job_id), "payload", payload) == 0  # the field existed
    finally:
        client.close()


@pytest.mark.parametrize("store", [pytest.param("redis", marks=pytest.mark.redis), "embedded"])
def test_a_payload_written_into_the_store_fails_its_job_and_runs_nothing(store, request, tmp_path):
    """The service's API server and a stage-1 worker run first, so jobs wait at stage 0, where
    an intruder with write access to the store takes them and hands stage 1 a pickle that
    would run `touch`. Then the stage-0 worker starts and normal jobs go through both stages."""
    pwned = tmp_path / "pwned"
    state = tmp_path / "state"
    env = {"BATCH_SIZE": "4"}
    broker = ""
    if store == "redis":
        broker = request.getfixturevalue("redis_url")
        env.update({"FASTDEPLOY_BROKER": broker, "FASTDEPLOY_STORE_SECRET": SECRET})
    with ExitStack() as stack:
        stage1 = stack.enter_context(
            serve(CHAIN, command="worker", args=["--stage", "1"], env=env, state_dir=state, ready=False))
        api = stack.enter_context(serve(CHAIN, command="serve", env=env, state_dir=state, ready=False))
        wait_for(lambda: 1 in ready_stages(api), 120, "the stage-1 worker", stage1, api)

        unsigned, wrong_key, at_stage_0 = (
            api.post("/async", {"data": [n]}).json()["unique_id"] for n in (1, 2, 3))
        intruder = open_store(broker, state)
        try:
            taken = {job.id for job in intruder.claim(0, 100, "intruder", 30)}
            assert taken == {unsigned, wrong_key, at_stage_0}
            intruder.finish([Outcome(unsigned, 0, payload=old_format(pwned), n_items=1),
                             Outcome(wrong_key, 0, payload=forged(pwned, wrong_key), n_items=1)], "intruder")
            intruder.release_worker("intruder")  # at_stage_0 goes back to the stage-0 queue
        finally:
            intruder.close()
        assert_failed(api, unsigned, REFUSED)
        assert_failed(api, wrong_key, REFUSED)
        if store == "redis":
            overwrite_redis_payload(broker, at_stage_0, old_format(pwned))

        stage0 = stack.enter_context(
            serve(CHAIN, command="worker", args=["--stage", "0"], env=env, state_dir=state, ready=False))
        api.wait_ready(120)
        if store == "redis":
            assert_failed(api, at_stage_0, "could not prepare the inputs: stage 0 takes only the API's msgpack "
                                            "inputs, never a pickled payload")
        else:
            assert api.wait_result(at_stage_0)["prediction"][0]["input"] == 3
        assert_chain_works(api, [4, 5])
        assert not pwned.exists()
        # the secret travels in the loops' environment, never on a command line or in a log
        secret = SECRET if store == "redis" else (state / "store_secret").read_text().strip()
        for worker in (stage0, stage1):
            (loop,) = loop_processes(worker)
            assert f"FASTDEPLOY_STORE_SECRET={secret}".encode() in Path(f"/proc/{loop}/environ").read_bytes().split(b"\0")
            for pid in (worker.proc.pid, *worker.children()):
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for server in (api, stage0, stage1):
            assert secret not in server.log()


@pytest.mark.redis
def test_hosts_with_different_secrets_fail_chain_jobs_with_the_hint(redis_url):
    base = {"FASTDEPLOY_BROKER": redis_url, "BATCH_SIZE": "4"}
    with ExitStack() as stack:
        stack.enter_context(serve(CHAIN, command="worker", args=["--stage", "0"],
                                  env={**base, "FASTDEPLOY_STORE_SECRET": SECRET}, ready=False))
        stack.enter_context(serve(CHAIN, command="worker", args=["--stage", "1"],
                                  env={**base, "FASTDEPLOY_STORE_SECRET": OTHER}, ready=False))
        api = stack.enter_context(serve(CHAIN, command="serve", env={**base, "FASTDEPLOY_STORE_SECRET": SECRET},
                                        ready_timeout=120))
        answer = api.post("/sync", {"data": [1]})
        assert answer.status_code == 500, answer.text
        assert answer.json()["reason"] == REFUSED


@pytest.mark.redis
@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_chain_on_a_broker_does_not_start_without_a_secret(redis_url, tmp_path, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env["FASTDEPLOY_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-m", "fastdeploy", command, str(CHAIN), "--broker", redis_url,
         *(["--port", "0"] if command == "run" else [])],  # workers serve no HTTP: --port is refused there
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fastdeploy: error: ") and "--store-secret" in lines[0]
    assert "FASTDEPLOY_STORE_SECRET" in lines[0]
    assert not (tmp_path / "state").exists()


@pytest.mark.redis
def test_api_servers_of_a_chain_need_no_store_secret(redis_url):
    # they never sign or read stage payloads: the secret stays on the hosts that run loops
    with serve(CHAIN, command="serve", args=["--broker", redis_url], ready=False) as api:
        deadline = time.monotonic() + 30
        while True:
            try:
                if api.get("/health").status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert api.proc.poll() is None and time.monotonic() < deadline, api.log()
            time.sleep(0.1)


def test_a_short_secret_is_refused_and_a_secret_flag_is_warned_about(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env["FASTDEPLOY_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-m", "fastdeploy", "run", str(CHAIN), "--store-secret", "short", "--port", "0"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "prefer FASTDEPLOY_STORE_SECRET" in done.stderr
    assert done.stderr.splitlines()[-1] == "fastdeploy: error: --store-secret must be at least 16 characters long"


# -- the embedded store's own secret ------------------------------------------------------------
def test_the_embedded_store_generates_its_secret_once_and_reuses_it(tmp_path):
    state = tmp_path / "state"
    path = state / "store_secret"
    with serve(CHAIN, state_dir=state, env={"BATCH_SIZE": "4"}) as server:
        assert_chain_works(server, [1, 2])
        secret = path.read_text().strip()
        assert len(secret) == 64 and int(secret, 16) >= 0  # 32 random bytes, hex
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loops = loop_processes(server)
        assert len(loops) == 2
        for pid in loops:
            assert f"FASTDEPLOY_STORE_SECRET={secret}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for pid in (server.proc.pid, *server.children()):
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        (api,) = set(server.children()) - set(loops)
        assert secret.encode() not in Path(f"/proc/{api}/environ").read_bytes()  # the API server needs none
        assert secret not in server.log()
    with serve(CHAIN, state_dir=state, env={"BATCH_SIZE": "4"}) as again:  # a restart reuses it
        assert_chain_works(again, [6])
        assert path.read_text().strip() == secret
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
