"""fastdeploy.client end to end: every method of Client and AsyncClient against the real
`fastdeploy` command, for a JSON and a FILE recipe; client-chosen ids and 409; retries on
429 with Retry-After; API keys; errors that say what happened."""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from fastdeploy.client import AsyncClient, Client, PredictionError
from tests.helpers import RECIPES, TEST_RECIPES, free_port, make_file_recipe, module_server, serve

FAST_START = ["--batch-size", "16"]
KEY = "client-test-key-0123456789abcdef"


def digest(name: str, data: bytes) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


echo = module_server(RECIPES / "echo", args=FAST_START)
faulty = module_server(TEST_RECIPES / "faulty", args=FAST_START)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    recipe = make_file_recipe(tmp_path_factory.mktemp("recipes") / "digest")
    with serve(recipe, args=[*FAST_START, "--max-body-mb", "1"]) as server:  # files go as multipart: no JSON bound
        yield server


# -- JSON recipe: every method ------------------------------------------------------------
def test_client_every_method_on_a_json_recipe(echo):
    with Client(echo.url, timeout=30) as c:
        assert c.predict(["hello", 42, {"a": [1]}]) == ["hello", 42, {"a": [1]}]
        assert c.predict([]) == []
        uid = c.submit(["later", 1], priority=3)
        assert isinstance(uid, str) and uid
        assert c.wait(uid, timeout=30) == ["later", 1]
        document = c.result(uid)
        assert document == {"unique_id": uid, "status": "done", "success": True, "prediction": ["later", 1]}


def test_async_client_every_method_on_a_json_recipe(echo):
    async def main() -> None:
        async with AsyncClient(echo.url, timeout=30) as c:
            answers = await asyncio.gather(*(c.predict([i, "x"]) for i in range(50)))
            assert answers == [[i, "x"] for i in range(50)]
            uid = await c.submit(["later"], webhook=None, priority=None)
            assert await c.wait(uid, timeout=30) == ["later"]
            assert (await c.result(uid))["status"] == "done"

    asyncio.run(main())


def test_client_is_shared_by_many_threads(echo):
    with Client(echo.url, timeout=30) as c, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: c.predict([i]), range(200)))
    assert answers == [[i] for i in range(200)]


# -- FILE recipe: every method --------------------------------------------------------------
def test_client_every_method_on_a_file_recipe(files, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG not really")
    with Client(files.url, timeout=30) as c:
        prediction = c.predict_files({"photo.png": str(photo), "dir/raw.bin": b"\x00\x01\x02", "p2.png": photo})
        assert prediction == {"photo.png": digest("photo.png", photo.read_bytes()),
                              "dir/raw.bin": digest("raw.bin", b"\x00\x01\x02"),
                              "p2.png": digest("p2.png", photo.read_bytes())}
        uid = c.submit({"a.txt": b"abc"})
        assert c.wait(uid, timeout=30) == {"a.txt": digest("a.txt", b"abc")}
        assert c.result(uid)["prediction"] == {"a.txt": digest("a.txt", b"abc")}
        with pytest.raises(PredictionError) as failed:
            c.predict(["a list to a FILE recipe"])
        assert failed.value.status == 400 and "files" in failed.value.reason
        odd = {'a"b.png': b"1", "\u00fc.png": b"2", "dir/x.png": b"3"}  # sent as JSON: names kept
        assert c.predict_files(odd) == {name: digest(name.rsplit("/", 1)[-1], data) for name, data in odd.items()}
        assert c.predict_files({}) == {}  # as in JSON (an empty multipart body would be refused)
        big = tmp_path / "big.bin"  # 3 MB: over the server's 1 MB JSON bound, so it went as multipart
        big.write_bytes(bytes(range(256)) * (3 * 4096))
        assert c.predict_files({"big.bin": big}) == {"big.bin": digest("big.bin", big.read_bytes())}


def test_async_client_every_method_on_a_file_recipe(files, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"async bytes")

    async def main() -> None:
        async with AsyncClient(files.url, timeout=30) as c:
            assert await c.predict_files({"x.png": photo}) == {"x.png": digest("x.png", b"async bytes")}
            uid = await c.submit({"b.txt": bytearray(b"b")}, priority=0)
            assert await c.wait(uid) == {"b.txt": digest("b.txt", b"b")}
            assert (await c.result(uid))["status"] == "done"

    asyncio.run(main())


# -- failures say what happened -------------------------------------------------------------
def test_a_failed_prediction_raises_with_status_id_and_reason(faulty):
    with Client(faulty.url, timeout=30) as c:
        with pytest.raises(PredictionError) as failed:
            c.predict(["ok", "boom"])
        error = failed.value
        assert error.status == 500 and "cannot predict 'boom'" in error.reason and error.unique_id
        assert error.reason in str(error) and error.unique_id in str(error)
        uid = c.submit(["boom"])
        with pytest.raises(PredictionError) as failed:
            c.wait(uid, timeout=30)
        assert failed.value.status == 500 and failed.value.unique_id == uid and "boom" in failed.value.reason
        with pytest.raises(PredictionError) as unknown:
            c.result("no-such-job")
        assert unknown.value.status == 404


def test_async_client_failures(faulty):
    async def main() -> None:
        async with AsyncClient(faulty.url, timeout=30) as c:
            with pytest.raises(PredictionError) as failed:
                await c.predict(["boom"])
            assert failed.value.status == 500 and failed.value.unique_id
            with pytest.raises(PredictionError) as refused:
                await c.predict(["x"], priority=12)
            assert refused.value.status == 400 and "priority" in refused.value.reason
            assert refused.value.unique_id is None

    asyncio.run(main())


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5) as c:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as refused:
            c.predict([1])
        assert url in str(refused.value) and time.monotonic() - started < 4  # not retried until the timeout

    async def main() -> None:
        async with AsyncClient(url, timeout=5) as c:
            with pytest.raises(ConnectionError) as refused:
                await c.submit([1])
            assert url in str(refused.value)

    asyncio.run(main())


# -- client-chosen ids -------------------------------------------------------------------
def test_client_chosen_ids_and_409_on_reuse(echo):
    with Client(echo.url, timeout=30) as c:
        assert c.predict(["mine"], unique_id="order-17:line.2") == ["mine"]
        assert c.result("order-17:line.2")["prediction"] == ["mine"]
        with pytest.raises(PredictionError) as taken:
            c.predict(["again"], unique_id="order-17:line.2")
        assert taken.value.status == 409 and "already in use" in taken.value.reason
        assert c.submit(["queued"], unique_id="order-18") == "order-18"
        assert c.wait("order-18") == ["queued"]
        with pytest.raises(PredictionError) as taken:
            c.submit(["x"], unique_id="order-18")
        assert taken.value.status == 409
        with pytest.raises(PredictionError) as bad:
            c.predict(["x"], unique_id="x" * 129)
        assert bad.value.status == 400 and "unique_id" in bad.value.reason
    body = requests.post(f"{echo.url}/sync", json={"data": [1], "unique_id": 7}, timeout=10)
    assert body.status_code == 400 and "unique_id" in body.json()["reason"]


def test_one_id_sent_many_times_at_once_is_accepted_once(echo):
    """Duplicates written in one group commit fail alone: the others in the group go through."""

    def send(i: int) -> tuple[int, int]:
        uid = "contested" if i % 2 == 0 else f"free-{i}"
        response = requests.post(f"{echo.url}/sync", json={"data": [i], "unique_id": uid}, timeout=30)
        return i, response.status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(send, range(64)))
    contested = [code for i, code in codes if i % 2 == 0]
    assert sorted(contested) == [200] + [409] * 31, contested
    assert all(code == 200 for i, code in codes if i % 2 == 1)


# -- retries and keys ------------------------------------------------------------------------
def test_429_is_retried_after_retry_after_within_the_timeout():
    env = {"FD_TEST_SLEEP": "1.5"}
    args = [*FAST_START, "--queue-limit-per-key", "1"]
    with serve(TEST_RECIPES / "slow", args=args, env=env) as server:
        with Client(server.url, timeout=30) as c:
            first = c.submit(["first"])  # holds the one slot for about 1.5 s
            started = time.monotonic()
            assert c.predict(["second"])[0]["echo"] == "second"  # 429 first, then retried
            assert time.monotonic() - started > 0.5
            assert c.wait(first)[0]["echo"] == "first"
            c.submit(["third"])
            with pytest.raises(PredictionError) as refused:
                c.predict(["fourth"], timeout=0.5)  # Retry-After is longer than this call's budget
            assert refused.value.status == 429


def test_503_is_retried_by_both_clients_within_the_timeout():
    """A full queue (--queue-limit) answers 503 with Retry-After: tried again while the call's budget lasts."""
    env = {"FD_TEST_SLEEP": "1"}
    args = ["--batch-size", "1", "--queue-limit", "1"]
    with serve(TEST_RECIPES / "slow", args=args, env=env) as server:
        def fill() -> None:  # jobs until one is refused: a second or more of work queued
            deadline = time.monotonic() + 10
            while requests.post(f"{server.url}/async", json={"data": ["fill"]}, timeout=10).status_code != 503:
                assert time.monotonic() < deadline, "the queue never filled"

        def sync_503s() -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in server.get("/metrics").text.splitlines()
                       if line.startswith("fastdeploy_requests_total{") and 'endpoint="sync"' in line
                       and 'status="503"' in line)

        fill()
        with Client(server.url, timeout=30) as c:
            assert c.predict(["blocking"])[0]["echo"] == "blocking"
        assert sync_503s() >= 1  # it met the full queue, and was tried again

        async def main() -> None:
            async with AsyncClient(server.url, timeout=30) as c:
                fill()
                before = sync_503s()
                assert (await c.predict(["asyncio"]))[0]["echo"] == "asyncio"
                assert sync_503s() > before
                fill()
                with pytest.raises(PredictionError) as refused:
                    await c.predict(["too soon"], timeout=1.0)  # its Retry-After reaches past this budget
                assert refused.value.status == 503 and "queue" in refused.value.reason

        asyncio.run(main())


def test_files_are_sent_again_whole_when_a_503_is_retried(tmp_path):
    recipe = make_file_recipe(tmp_path / "slow_digest")
    photo = tmp_path / "photo.bin"
    photo.write_bytes(bytes(range(256)) * 4096)  # 1 MB, read from its path at each attempt
    args = ["--batch-size", "1", "--queue-limit", "1"]
    with serve(recipe, args=args, env={"FD_TEST_SLEEP": "1"}) as server:
        deadline = time.monotonic() + 10
        while requests.post(f"{server.url}/async", files={"f.bin": b"fill"}, timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "the queue never filled"
        with Client(server.url, timeout=30) as c:
            assert c.predict_files({"photo.bin": photo}) == {"photo.bin": digest("photo.bin", photo.read_bytes())}
        refused = [line for line in server.get("/metrics").text.splitlines()
                   if line.startswith("fastdeploy_requests_total{") and 'endpoint="sync"' in line and '"503"' in line]
        assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 1, refused


def test_api_key_is_sent_as_bearer():
    with serve(RECIPES / "echo", args=FAST_START, env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        with Client(server.url, api_key=KEY, timeout=30) as c:
            assert c.predict(["keyed"]) == ["keyed"]
            assert c.wait(c.submit(["k"])) == ["k"]
        with Client(server.url, timeout=30) as c:
            with pytest.raises(PredictionError) as refused:
                c.predict(["no key"])
            assert refused.value.status == 401

        async def main() -> None:
            async with AsyncClient(server.url, api_key=KEY) as c:
                assert await c.predict(["async keyed"]) == ["async keyed"]

        asyncio.run(main())


def test_wait_times_out_and_a_cancelled_job_raises_409():
    with serve(TEST_RECIPES / "slow", args=FAST_START, env={"FD_TEST_SLEEP": "2"}) as server:
        with Client(server.url, timeout=30) as c:
            busy = c.submit(["busy"])
            with pytest.raises(TimeoutError) as late:
                c.wait(busy, timeout=0.3)
            assert busy in str(late.value)
            queued = c.submit(["queued behind"])
            assert requests.post(f"{server.url}/cancel", json={"unique_id": queued}, timeout=10).status_code == 200
            with pytest.raises(PredictionError) as cancelled:
                c.wait(queued)
            assert cancelled.value.status == 409 and cancelled.value.unique_id == queued
