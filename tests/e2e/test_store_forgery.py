"""A Redis writer cannot turn a worker against the host: forged job records, written straight into Redis.

Through the real CLI (`fastdeploy run` of a FILE recipe on a broker with a shared --files-dir):
- without a store secret, a job whose id is an absolute path (or holds a newline) fails unread: the
  worker neither hands the predictor that folder's files nor deletes the folder, and no log line is
  forged; records with a non-numeric item count or deadline fail alone and the stage keeps serving;
- with --store-secret, a job record written by anyone without the secret (even with a well-formed id
  whose upload folder exists) makes the worker read, run and delete nothing; a record signed by the
  API for one job and copied under another id, owner or item count is refused the same way;
- what no signature covers cannot stop the service either: a queued job's priority that is not a
  number, a lease or attempt count that is not a number, a job's or a webhook's key (or a lane) of
  another Redis type. Each used to make a Lua script raise: a chain's stage retried one batch forever,
  or every maintenance pass failed and every API server answered 503, or no job (or no webhook) was
  taken any more.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import requests

from fastdeploy.jobs import JOB_NOT_SIGNED_REASON
from fastdeploy.store.redis import MALFORMED_REASON, Keys, _split_url
from tests.helpers import RECIPES, TEST_RECIPES, Server, make_file_recipe, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, Receiver

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

SECRET = "0123456789abcdef" * 4
NOT_SIGNED = f"could not prepare the inputs: {JOB_NOT_SIGNED_REASON}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    url, prefix = _split_url(redis_url)
    client = redis.Redis.from_url(url)
    client.fd_keys = Keys(prefix)  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        client.close()


def forge(client: Any, job_id: bytes | str, payload: bytes, *, n_items: Any = 1, deadline: Any = "",
          owner: str = "127.0.0.1", seq: int = 10**9) -> None:
    """Queue a job at stage 0 the way the submit script does, but written by hand, as an intruder could."""
    keys: Keys = client.fd_keys
    raw_id = job_id.encode() if isinstance(job_id, str) else job_id
    client.hset(keys.job_prefix.encode() + raw_id, mapping={
        "stage": "0", "status": "queued", "priority": "5", "seq": seq, "payload": payload, "n_items": n_items,
        "deadline": deadline, "webhook": "", "origin": "", "owner": owner, "attempts": "0", "created": time.time(),
    })
    client.zadd(keys.queue(0, owner), {raw_id: 5 * 10**12 + seq})
    client.zadd(keys.lanes(0), {owner: 0})
    client.sadd(keys.stages, "0")
    client.rpush(keys.bell(0), "1")


def job_fields(client: Any, job_id: bytes | str) -> dict[str, str]:
    raw_id = job_id.encode() if isinstance(job_id, str) else job_id
    fields = client.hgetall(client.fd_keys.job_prefix.encode() + raw_id)
    return {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}


def wait_finished(client: Any, job_id: bytes | str, server: Server) -> dict[str, str]:
    def finished() -> dict[str, str] | None:
        fields = job_fields(client, job_id)
        return fields if fields.get("status") in ("done", "failed") else None

    try:
        return wait_until(finished, 60, f"the forged job {job_id!r} to end")
    except AssertionError:
        raise AssertionError(f"{job_fields(client, job_id)}\n{server.log()[-3000:]}") from None


def upload_ref(folder: str, name: str = "a.txt") -> bytes:
    """The stage-0 payload of an uploaded file: where the API server left it (see uploads.py)."""
    return msgpack.packb({"i": [[name, {"upload": folder}]], "k": [name]}, use_bin_type=True)


def victim_folder(where: Path, content: bytes) -> Path:
    where.mkdir(parents=True)
    (where / "a.txt").write_bytes(content)
    return where


def assert_serves_files(server: Server) -> None:
    answer = requests.post(server.url + "/sync", files={"f.txt": ("f.txt", b"hello")}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction"]["f.txt"]["size"] == 5


def test_without_a_secret_a_forged_id_reads_and_deletes_nothing(redis_url, redis_client, tmp_path):
    recipe = make_file_recipe(tmp_path / "recipe")
    files = tmp_path / "files"
    victim = victim_folder(tmp_path / "elsewhere" / "victim", b"private bytes")
    with serve(recipe, args=["--broker", redis_url, "--files-dir", str(files)]) as server:
        # an absolute path as the id: files root / id is that path
        forge(redis_client, str(victim), upload_ref("victim"))
        # a newline in the id would forge a log line; non-numbers where the claim does arithmetic
        forge(redis_client, "x\nERROR forged log line", upload_ref("x"), seq=10**9 + 1)
        forge(redis_client, "bad-count", upload_ref("bad-count"), n_items="many", seq=10**9 + 2)
        forge(redis_client, "bad-deadline", upload_ref("bad-deadline"), deadline="soon", seq=10**9 + 3)
        forge(redis_client, b"\xff\xfe-not-utf8", upload_ref("x"), seq=10**9 + 4)
        for job_id in (str(victim), "x\nERROR forged log line", "bad-count", "bad-deadline", b"\xff\xfe-not-utf8"):
            fields = wait_finished(redis_client, job_id, server)
            assert fields["status"] == "failed", (job_id, fields)
            assert fields["reason"] == MALFORMED_REASON, (job_id, fields)
            assert "result" not in fields
        assert (victim / "a.txt").read_bytes() == b"private bytes"  # not read for a predictor, not deleted
        assert_serves_files(server)  # the stage goes on serving
        assert not any(line.startswith("ERROR forged") for line in server.log().splitlines())
        # its failures reach /result as a failure, never as a server error
        answer = server.post("/result", {"unique_id": "bad-count"})
        assert answer.status_code == 200 and answer.json()["status"] == "failed", answer.text


def test_with_a_secret_only_records_the_api_signed_for_that_job_are_predicted(redis_url, redis_client, tmp_path):
    recipe = make_file_recipe(tmp_path / "recipe")
    files = tmp_path / "files"
    env = {"FASTDEPLOY_BROKER": redis_url, "FASTDEPLOY_STORE_SECRET": SECRET, "FASTDEPLOY_FILES_DIR": str(files)}
    with ExitStack() as stack:
        api = stack.enter_context(serve(recipe, command="serve", env=env, ready=False))
        wait_until(lambda: _health(api), 60, "the API server")
        # a job the API server signed, queued while no worker runs: its record is copied under other ids
        answer = requests.post(api.url + "/async", files={"a.txt": ("a.txt", b"genuine")}, timeout=30)
        assert answer.status_code == 200, answer.text
        genuine = answer.json()["unique_id"]
        signed = job_fields(redis_client, genuine)
        raw_payload = redis_client.hget(redis_client.fd_keys.job(genuine), "payload")
        assert raw_payload[:2] == b"J1"
        # an existing upload folder under a well-formed id, and an unsigned record pointing at it
        victim = victim_folder(files / "victim", b"private bytes")
        forge(redis_client, "victim", upload_ref("victim"), seq=10**9)
        # the genuine signed record, copied under another id, another owner, another item count
        forge(redis_client, "copied", raw_payload, owner=signed["owner"], seq=10**9 + 1)
        forge(redis_client, "other-owner", raw_payload, owner="key:someone", seq=10**9 + 2)
        forge(redis_client, genuine + "x", raw_payload, n_items=2, owner=signed["owner"], seq=10**9 + 3)

        worker = stack.enter_context(serve(recipe, command="worker", env=env, ready=False))
        assert api.wait_result(genuine, timeout=90)["prediction"]["a.txt"]["size"] == 7
        for job_id in ("victim", "copied", "other-owner", genuine + "x"):
            fields = wait_finished(redis_client, job_id, worker)
            assert (fields["status"], fields["reason"]) == ("failed", NOT_SIGNED), (job_id, fields)
        assert (victim / "a.txt").read_bytes() == b"private bytes"  # neither read nor deleted
        assert not (files / genuine).exists()  # the genuine job's own folder went once it was recorded
        assert_serves_files(api)


def _health(server: Server) -> bool:
    try:
        return server.get("/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


# -- what a signature does not cover (H1) ---------------------------------------------------------------
def assert_keeps_serving(server: Server, times: int = 3) -> None:
    """Several /sync requests a maintenance pass apart (0.5 s): each one answered, none 503."""
    for i in range(times):
        answer = server.post("/sync", {"data": [i]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["prediction"] == [i], (answer.status_code, answer.text)
        time.sleep(0.6)


def test_a_queued_jobs_priority_that_is_not_a_number_does_not_wedge_a_chain(redis_url, redis_client):
    """The API server signs a job's inputs, not its queue position: a genuine job of a chain whose
    priority was rewritten to a word used to fail the finishing script when stage 1 queued it for stage 2
    ('arithmetic on a nil value'); the batch stayed unrecorded and the loop retried it for ever."""
    env = {"FASTDEPLOY_BROKER": redis_url, "FASTDEPLOY_STORE_SECRET": SECRET}
    recipe = TEST_RECIPES / "chain"
    with ExitStack() as stack:
        api = stack.enter_context(serve(recipe, command="serve", env=env, ready=False))
        wait_until(lambda: _health(api), 60, "the API server")
        genuine = api.post("/async", {"data": [3]}).json()["unique_id"]
        redis_client.hset(redis_client.fd_keys.job(genuine), mapping={"priority": "urgent", "seq": "first"})
        stack.enter_context(serve(recipe, command="worker", env=env, ready=False))
        answer = api.wait_result(genuine, timeout=60)
        assert answer["status"] == "done" and answer["prediction"][0]["double"] == 6, answer
        synced = api.post("/sync", {"data": [4]}, timeout=60)
        assert synced.status_code == 200 and synced.json()["prediction"][0]["double"] == 8, synced.text


def test_a_lease_or_attempt_count_that_is_not_a_number_does_not_stop_the_api_servers(redis_url, redis_client):
    """A leased record whose lease_until is a word made every maintenance pass raise: every /sync and
    /async of every API server answered 503, for good. Now a lease that is not a number has run out:
    the job is taken back (requeued, whatever its attempt count and priority say) or, with no stage to
    go back to, fails alone as malformed."""
    keys: Keys = redis_client.fd_keys
    with serve(RECIPES / "echo", args=["--broker", redis_url]) as server:
        redis_client.hset(keys.job("z"), mapping={"status": "processing", "lease_until": "abc"})
        redis_client.hset(keys.job("z2"), mapping={
            "stage": "0", "status": "processing", "lease_until": "later", "attempts": "many", "priority": "high",
            "seq": "x", "owner": "127.0.0.1", "worker": "gone"})
        redis_client.zadd(keys.leased, {"z": 0, "z2": 0})
        for job_id in ("z", "z2"):  # z2 is requeued, then failed by the claim: it has no inputs
            fields = wait_finished(redis_client, job_id, server)
            assert (fields["status"], fields["reason"]) == ("failed", MALFORMED_REASON), (job_id, fields)
        assert_keeps_serving(server)
        assert server.get("/ready").status_code == 200


def test_keys_of_another_type_where_a_job_or_a_lane_should_be_are_passed_over(redis_url, redis_client):
    """A list where a queued job's hash should be (or where a lane's sorted set should be) made every
    claim of the stage raise (no job was taken any more), and the lane made the queue counts raise (every
    request 503). Now such a key is no job and no lane: its index entry is dropped, /result says 404."""
    keys: Keys = redis_client.fd_keys
    with serve(RECIPES / "echo", args=["--broker", redis_url]) as server:
        redis_client.rpush(keys.job("listed"), "not a hash")
        redis_client.zadd(keys.queue(0, "intruder"), {"listed": 1})
        redis_client.set(keys.queue(0, "intruder-2"), "not a sorted set")
        redis_client.zadd(keys.lanes(0), {"intruder": 0, "intruder-2": 0})
        redis_client.rpush(keys.bell(0), "1")
        assert_keeps_serving(server)
        wait_until(lambda: redis_client.zcard(keys.lanes(0)) == 0, 10, "the lanes of other types dropped")
        answer = server.post("/result", {"unique_id": "listed"})
        assert answer.status_code == 404 and answer.json()["status"] == "not_found", answer.text
        assert server.get("/ready").status_code == 200


def test_a_webhook_key_of_another_type_does_not_stop_the_other_deliveries(redis_url, redis_client):
    """A list where a pending webhook's hash should be made every pass of the webhook sender raise:
    no webhook was delivered any more. Now the entry is dropped and the others go out."""
    keys: Keys = redis_client.fd_keys
    with Receiver() as receiver, serve(RECIPES / "echo", args=["--broker", redis_url, *ALLOW_LOCAL]) as server:
        redis_client.rpush(keys.hook("listed"), "not a hash")
        redis_client.zadd(keys.outbox, {"listed": 0})
        unique_id = server.post("/async", {"data": [7], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        (body,) = receiver.wait_for("/ok", 1, timeout=30)
        assert body["unique_id"] == unique_id and body["prediction"] == [7]
        assert redis_client.zscore(keys.outbox, "listed") is None
