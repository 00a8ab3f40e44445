"""The fastDeploy 3.x protocol (POST /infer) end to end, spoken by the real fdclient 3.1.2
from PyPI, unchanged, against the real `fastdeploy` command; and the 3.x names (command
line, environment variables, /prometheus_metrics)."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import requests
import zstandard

from tests.helpers import RECIPES, ROOT, TEST_RECIPES, free_port, make_file_recipe, module_server, serve

fdclient = pytest.importorskip("fdclient", reason="pip install fdclient==3.1.2 msgpack zstandard (the test extra)")
FDClient, FDClientAsync = fdclient.FDClient, fdclient.FDClientAsync
FAST_START = ["--batch-size", "16"]  # skip the batch-size search: these tests are about the protocol


def plain(value: Any) -> Any:
    """fdclient decodes msgpack with use_list=False: tuples back to lists, to compare with what was sent."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def infer_raw(url: str, body: bytes, **params: Any) -> requests.Response:
    query = {"input_type": "msgpack", "compressed": "false", **params}
    return requests.post(f"{url}/infer", params=query, data=body, timeout=30,
                         headers={"Content-Type": "application/octet-stream"})


def decoded(response: requests.Response, input_type: str = "msgpack", compressed: bool = False) -> dict:
    data = zstandard.ZstdDecompressor().decompress(response.content) if compressed else response.content
    if input_type == "msgpack":
        return msgpack.unpackb(data, raw=False)
    return json.loads(data)


echo = module_server(RECIPES / "echo", args=[*FAST_START, "--max-body-mb", "1"])
faulty = module_server(TEST_RECIPES / "faulty", args=FAST_START)


# -- values round-trip -----------------------------------------------------------------
def test_fdclient_picks_msgpack_and_values_round_trip(echo):
    client = FDClient(echo.url, request_timeout=10)
    assert client.input_type == "msgpack"  # /meta?is_pickle_allowed= says no: fdclient chooses msgpack itself
    data = ["hello", 42, -7, 1.5, None, True, {"a": [1, 2, {"b": "c"}]}, [], "ünïcödé", 2**40]
    answer = client.infer(data)
    assert answer["success"] is True and answer["reason"] is None
    assert plain(answer["prediction"]) == data
    assert isinstance(answer["unique_id"], str) and answer["unique_id"]
    # the job behind it is an ordinary one: readable at /result under the id fdclient chose
    result = echo.post("/result", {"unique_id": answer["unique_id"]}).json()
    assert result["status"] == "done" and result["prediction"] == data


def test_empty_list_and_the_async_flag(echo):
    client = FDClient(echo.url, request_timeout=10)
    assert plain(client.infer([])["prediction"]) == []
    answer = client.infer_async(["later", 2])  # 3.x answered infer_async with the prediction too
    assert answer["success"] is True and plain(answer["prediction"]) == ["later", 2]


def test_a_client_chosen_unique_id_is_kept_and_reuse_is_refused(echo):
    client = FDClient(echo.url, request_timeout=10)
    answer = client.infer(["mine"], unique_id="fd3-client:id.1")
    assert answer["success"] is True and answer["unique_id"] == "fd3-client:id.1"
    again = client.infer(["again"], unique_id="fd3-client:id.1")
    assert again["success"] is False and "already in use" in again["reason"]
    assert again["unique_id"] == "fd3-client:id.1" and again["prediction"] is None
    response = infer_raw(echo.url, msgpack.packb(["x"]), unique_id="fd3-client:id.1")
    assert response.status_code == 409 and decoded(response)["success"] is False
    response = infer_raw(echo.url, msgpack.packb(["x"]), unique_id="no spaces/or slashes")
    assert response.status_code == 400 and "unique_id" in decoded(response)["reason"]


def test_many_threads_at_once_each_get_their_own_answer(echo):
    client = FDClient(echo.url, request_timeout=30)

    def one(i: int) -> tuple[int, dict]:
        return i, client.infer([i, f"s{i}", {"n": i}])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(400)))
    for i, answer in answers:
        assert answer["success"] is True, answer
        assert plain(answer["prediction"]) == [i, f"s{i}", {"n": i}]
    assert len({a["unique_id"] for _, a in answers}) == 400


def test_the_asyncio_client_many_at_once(echo):
    async def main() -> list[dict]:
        async with FDClientAsync(echo.url, request_timeout=30) as client:
            calls = [client.infer([i, "a"]) for i in range(150)] + [client.infer_async([i, "b"]) for i in range(50)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert [plain(a["prediction"]) for a in answers] == [[i, "a"] for i in range(150)] + [[i, "b"] for i in range(50)]


def test_sync_with_a_3x_query_speaks_the_3x_protocol_as_3x_did(echo):
    packed = zstandard.ZstdCompressor().compress(msgpack.packb(["a", 1]))
    response = requests.post(f"{echo.url}/sync", params={"input_type": "msgpack", "compressed": "true"},
                             data=packed, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert plain(decoded(response, compressed=True)["prediction"]) == ["a", 1]
    plain_json = requests.post(f"{echo.url}/sync", json={"data": ["b"]}, timeout=30)  # the original API, as before
    assert plain_json.json()["prediction"] == ["b"] and "reason" not in plain_json.json()


def test_json_without_compression_and_the_3x_data_wrapper(echo):
    for body in (b'["j", 1]', b'{"data": ["j", 1]}'):
        response = requests.post(f"{echo.url}/infer", params={"input_type": "json"}, data=body, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert response.json() == {"success": True, "unique_id": response.json()["unique_id"],
                                   "prediction": ["j", 1], "reason": None}
    compressed = zstandard.ZstdCompressor().compress(msgpack.packb(["z"]))
    response = infer_raw(echo.url, compressed, compressed="True")
    assert response.headers["content-type"] == "application/octet-stream"
    assert decoded(response, compressed=True)["prediction"] == ["z"]
    response = infer_raw(echo.url, msgpack.packb(["m"]))
    assert response.headers["content-type"] == "application/msgpack"


# -- failures ---------------------------------------------------------------------------
def test_a_failing_input_fails_its_request_only(faulty):
    client = FDClient(faulty.url, request_timeout=20)
    with ThreadPoolExecutor(8) as pool:
        bad = pool.submit(client.infer, ["a", "boom"])
        good = [pool.submit(client.infer, [f"ok{i}"]) for i in range(20)]
    answer = bad.result()
    assert answer["success"] is False and "cannot predict 'boom'" in answer["reason"]
    assert answer["prediction"] is None and answer["unique_id"]
    assert all(plain(g.result()["prediction"]) == [f"ok{i}"] for i, g in enumerate(good))
    response = infer_raw(faulty.url, msgpack.packb(["boom"]))
    assert response.status_code == 500 and "boom" in decoded(response)["reason"]


def test_the_clients_timeout_bounds_the_wait_and_a_bad_one_is_400():
    with serve(TEST_RECIPES / "slow", args=FAST_START, env={"FD_TEST_SLEEP": "8"}) as server:
        started = time.monotonic()  # fdclient sends timeout=5 and itself gives up 10 % later
        answer = FDClient(server.url, request_timeout=5).infer(["late"])
        assert time.monotonic() - started < 7.5, "the wait was not bounded by the client's timeout"
        assert answer["success"] is False and "timeout" in answer["reason"] and answer["unique_id"]
        response = infer_raw(server.url, msgpack.packb(["late"]), timeout="0.3")
        assert response.status_code == 500 and response.headers["content-type"] == "application/msgpack"
        assert "timeout" in decoded(response)["reason"]
        for bad in ("abc", "-1", "0"):
            refused = infer_raw(server.url, msgpack.packb(["x"]), timeout=bad)
            assert refused.status_code == 400 and "timeout" in decoded(refused)["reason"], bad


class _Marker:
    """Unpickling this creates a file: proof of whether the server ever unpickled the body."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_request_is_refused_and_never_unpickled(echo, tmp_path):
    marker = tmp_path / "unpickled"
    evil = _Marker()
    evil.path = str(marker)
    body = pickle.dumps([evil])
    response = requests.post(f"{echo.url}/infer", params={"input_type": "pickle", "compressed": "false"},
                             data=body, timeout=10)
    assert response.status_code == 400 and response.headers["content-type"] == "application/pickle"
    refusal = pickle.loads(response.content)  # our own answer: a plain dict
    assert refusal["success"] is False and "ALLOW_PICKLE" in refusal["reason"]
    assert not marker.exists()
    # fdclient itself, told to use pickle, gets the refusal as a readable answer
    client = FDClient(echo.url, request_timeout=10)
    client.input_type = "pickle"
    answer = client.infer(["x"])
    assert answer["success"] is False and "pickle" in answer["reason"]
    assert not marker.exists()


DEEP: list = [1]
for _ in range(80):
    DEEP = [DEEP]
GARBAGE = [
    ("msgpack", "false", b"\xc1\xc1\xc1 not msgpack", 400),
    ("msgpack", "false", msgpack.packb({"not": "a list"}), 400),
    ("msgpack", "false", msgpack.packb(42), 400),
    ("msgpack", "false", msgpack.packb([1]) + b"trailing", 400),
    ("msgpack", "false", b"", 400),
    ("msgpack", "true", b"definitely not zstd", 400),
    ("msgpack", "true", zstandard.ZstdCompressor().compress(msgpack.packb(["cut"] * 50))[:-6], 400),
    ("json", "false", b"{not json", 400),
    ("json", "false", b'"a string"', 400),
    ("yaml", "false", b"- a", 400),
    ("msgpack", "true", zstandard.ZstdCompressor().compress(b"\x00" * (3 << 20)), 413),  # 3 MiB from 100 bytes
    ("msgpack", "false", msgpack.packb(DEEP), 400),  # nested deeper than any JSON body may be
]


@pytest.mark.parametrize("input_type,compressed,body,status", GARBAGE)
def test_garbage_bodies_are_answered_400_in_the_clients_format(echo, input_type, compressed, body, status):
    response = requests.post(f"{echo.url}/infer", params={"input_type": input_type, "compressed": compressed},
                             data=body, timeout=10)
    assert response.status_code == status, response.content
    shown_type = input_type if input_type in ("msgpack", "json") else "json"
    answer = decoded(response, shown_type, compressed == "true")
    assert answer["success"] is False and answer["reason"] and answer["prediction"] is None
    assert "Traceback" not in answer["reason"]
    assert FDClient(echo.url, request_timeout=10).infer(["still fine"])["success"] is True


def test_meta_answers_is_pickle_allowed_and_the_3x_metrics_path(echo):
    meta = requests.get(f"{echo.url}/meta", params={"is_pickle_allowed": ""}, timeout=10).json()
    assert meta["is_pickle_allowed"] is False and meta["name"] == "echo"
    metrics = requests.get(f"{echo.url}/prometheus_metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'endpoint="infer"' in metrics.text  # /infer requests are counted like /sync's


# -- ALLOW_PICKLE on, FILE recipes ------------------------------------------------------
def test_with_allow_pickle_fdclient_uses_pickle():
    with serve(RECIPES / "echo", args=FAST_START, env={"ALLOW_PICKLE": "true"}) as server:
        assert requests.get(f"{server.url}/meta", params={"is_pickle_allowed": ""}, timeout=10).json()[
            "is_pickle_allowed"] is True
        client = FDClient(server.url, request_timeout=10)
        assert client.input_type == "pickle"
        answer = client.infer(["p", 1, {"k": [2]}])
        assert answer == {"success": True, "unique_id": answer["unique_id"], "prediction": ["p", 1, {"k": [2]}],
                          "reason": None}
        response = requests.post(f"{server.url}/infer", params={"input_type": "pickle"},
                                 data=pickle.dumps([object()]), timeout=10)
        assert response.status_code == 400 and "plain values" in pickle.loads(response.content)["reason"]


def test_a_file_recipe_takes_bytes_and_named_pairs(tmp_path):
    import hashlib

    recipe = make_file_recipe(tmp_path / "digest")
    with serve(recipe, args=FAST_START) as server:
        client = FDClient(server.url, request_timeout=10)
        answer = client.infer([b"first file", ["photo.png", b"\x89PNG..."]])
        assert answer["success"] is True, answer
        first, second = plain(answer["prediction"])
        assert first == {"name": "file0", "size": 10, "sha256": hashlib.sha256(b"first file").hexdigest()}
        assert second["name"] == "photo.png" and second["size"] == 7
        answer = client.infer(["not bytes"])
        assert answer["success"] is False and "file's content" in answer["reason"]


# -- the 3.x names: command line and environment variables -------------------------------
def _start_3x(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    full.update(env)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fastdeploy", *args], env=full, stdout=out,
                                stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each stopped (and its process group killed) at the end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_ready(url: str, procs: list[subprocess.Popen], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), log.read_text(errors="replace")
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(log.read_text(errors="replace"))


def test_the_3x_command_line_rest_and_loop_work_together(started, tmp_path):
    port = free_port()
    log = tmp_path / "log.txt"
    state = Path(tempfile.mkdtemp(prefix="fd-state-", dir=tmp_path))
    env = {"HOST": "127.0.0.1", "PORT": str(port), "FASTDEPLOY_STATE_DIR": str(state), "WORKERS": "1",
           "OPTIMAL_BATCH_SIZE": "3", "MAX_REQUEST_BATCH_SIZE": "5", "FASTDEPLOY_HEARTBEAT_SECONDS": "0.2"}
    recipe = str(RECIPES / "echo")
    started.append(_start_3x(["--recipe", recipe, "--rest"], env, log))  # 3.x's Dockerfile: --rest & --loop
    started.append(_start_3x(["--recipe", recipe, "--loop"], env, log))
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, started, log)
    text = log.read_text()
    assert f"running `fastdeploy serve {recipe}`" in text and f"running `fastdeploy worker {recipe}`" in text
    client = FDClient(url, request_timeout=10)
    assert plain(client.infer(["via", "3.x", "cli"])["prediction"]) == ["via", "3.x", "cli"]
    meta = requests.get(f"{url}/meta", timeout=10).json()
    assert meta["stages"][0]["batch_size"] == 3  # OPTIMAL_BATCH_SIZE
    too_many = client.infer(list(range(6)))  # MAX_REQUEST_BATCH_SIZE
    assert too_many["success"] is False and "at most 5" in too_many["reason"]


def test_3x_command_lines_without_a_counterpart_stop_with_one_line():
    for args, expected in ((["--recipe", "recipes/echo", "--build"], "fastdeploy run recipes/echo"),
                           (["--recipe", "recipes/echo"], "fastdeploy run recipes/echo"),
                           (["--recipe", "recipes/echo", "--rest", "--config", "colour=blue"], "'colour'")):
        done = subprocess.run([sys.executable, "-m", "fastdeploy", *args], capture_output=True, text=True,
                              cwd=str(ROOT), timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("fastdeploy: error:"), done.stderr


def test_with_api_keys_fdclient_sends_one_through_its_session():
    key = "fd3-client-key-0123456789abcdef"
    with serve(RECIPES / "echo", args=FAST_START, env={"FASTDEPLOY_API_KEYS": key}) as server:
        refused = infer_raw(server.url, msgpack.packb(["x"]))
        assert refused.status_code == 401 and "API key" in decoded(refused)["reason"]  # in the client's format
        assert refused.headers["www-authenticate"].startswith("Bearer")
        # fdclient has no key option; a requests session with the header set carries it
        client = FDClient(server.url, request_timeout=10, use_requests_session=True)
        client.requests_session.headers["Authorization"] = f"Bearer {key}"
        answer = client.infer(["keyed"])  # /meta is asked again now that the key goes with it
        assert answer["success"] is True and plain(answer["prediction"]) == ["keyed"]


# -- issue #25, points 5 and 7: the answer built once; what becomes of NaN ------------------------
def test_a_nan_sent_over_msgpack_comes_back_as_null_on_every_wire(echo):
    """Outputs are stored as JSON, which has no NaN or infinity: they come back as null (None) on
    /infer's msgpack and JSON wires and on /sync alike (the README says so)."""
    client = FDClient(echo.url, request_timeout=10)
    assert plain(client.infer([float("nan"), float("inf"), -float("inf"), 1.5])["prediction"]) == [None, None, None, 1.5]
    answer = decoded(infer_raw(echo.url, msgpack.packb([float("nan"), 2]), input_type="msgpack"))
    assert answer["success"] is True and answer["prediction"] == [None, 2]
    answer = infer_raw(echo.url, b'[1, "two", {"three": [3.25]}]', input_type="json")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {"success": True, "unique_id": answer.json()["unique_id"],
                             "prediction": [1, "two", {"three": [3.25]}], "reason": None}
