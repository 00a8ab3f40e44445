"""The seed API end to end: the real `fastdeploy run` process, real HTTP."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import requests

from tests.helpers import RECIPES, TEST_RECIPES, serve


@pytest.fixture(scope="module")
def echo():
    with serve(RECIPES / "echo") as server:
        yield server


def test_seed_python_example_works_unchanged(echo):
    # the seed API.md snippet, verbatim apart from the address
    data = ["INPUT_1", {"INPUT": 2}]
    response = requests.post(f"{echo.url}/sync", json={"data": data}).json()
    assert response["success"] is True
    assert response["prediction"] == data
    response = requests.post(f"{echo.url}/async", json={"data": data}).json()
    assert response["success"] is True
    result = requests.post(f"{echo.url}/result", json={"unique_id": response["unique_id"]}).json()
    assert result["status"] in ("queued", "processing", "done")


def test_sync_answer_shape(echo):
    response = echo.post("/sync", {"data": [1, "two", None, [3]]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "prediction", "unique_id"}
    assert body["prediction"] == [1, "two", None, [3]]


def test_sync_result_is_readable_at_result_repeatedly(echo):
    unique_id = echo.post("/sync", {"data": ["again"]}).json()["unique_id"]
    for _ in range(3):
        body = echo.post("/result", {"unique_id": unique_id}).json()
        assert body == {"unique_id": unique_id, "status": "done", "success": True, "prediction": ["again"]}


def test_sync_answers_of_every_size_arrive_whole(echo):
    # small outcomes come back inside the loop's ring, ones over a datagram (60 KB) as an id
    for size in (10, 50_000, 200_000):
        data = ["x" * size, {"n": size}]
        body = echo.post("/sync", {"data": data}).json()
        assert body["success"] is True and body["prediction"] == data


def test_async_then_result_until_done(echo):
    response = echo.post("/async", {"data": [{"k": 1}, 2]})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"success", "unique_id"} and body["success"] is True
    result = echo.wait_result(body["unique_id"])
    assert result["status"] == "done" and result["success"] is True
    assert result["prediction"] == [{"k": 1}, 2]


def test_empty_data_succeeds_with_empty_prediction(echo):
    body = echo.post("/sync", {"data": []}).json()
    assert body["success"] is True and body["prediction"] == []


@pytest.mark.parametrize("unique_id", ["no-such-id", "", "x" * 500, "../../etc/passwd", "' OR 1=1 --"])
def test_unknown_ids_are_not_found(echo, unique_id):
    response = echo.post("/result", {"unique_id": unique_id})
    assert response.status_code == 404
    body = response.json()
    assert body["status"] == "not_found" and body["success"] is False and body["unique_id"] == unique_id
    assert "unknown" in body["reason"]


def test_health_ready_meta(echo):
    assert echo.get("/health").status_code == 200
    assert echo.get("/ready").json() == {"success": True, "status": "ready"}
    meta = echo.get("/meta").json()
    assert meta["name"] == "echo" and meta["input_type"] == "json"
    assert meta["example"] == ["hello", {"a": 1}, [1, 2, 3], 4.5]
    assert len(meta["stages"]) == 1 and meta["stages"][0]["batch_size"] >= 1
    assert meta["limits"]["timeout"] == 480.0


def test_metrics_are_prometheus_text(echo):
    echo.post("/sync", {"data": [1, 2, 3]})
    echo.post("/sync", {"data": "wrong"})
    text = echo.get("/metrics").text
    assert re.search(r'fastdeploy_requests_total\{endpoint="sync",status="200"\} \d', text)
    assert re.search(r'fastdeploy_requests_total\{endpoint="sync",status="400"\} \d', text)
    assert 'fastdeploy_request_seconds_bucket{endpoint="sync",le="0.005"}' in text
    assert 'fastdeploy_queue_depth{stage="0"} 0.0' in text
    assert 'fastdeploy_workers{stage="0"} 1.0' in text
    # the batch histogram comes from the loops' heartbeats, so it lags by up to a second
    deadline = time.monotonic() + 10
    while not re.search(r'fastdeploy_batch_size_count\{stage="0"\} [1-9]', text):
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
        text = echo.get("/metrics").text


def test_openapi_document(echo):
    doc = echo.get("/openapi.json").json()
    assert {"/sync", "/async", "/result", "/health", "/ready", "/meta", "/metrics"} <= set(doc["paths"])


def test_unknown_path_and_method_are_json_errors(echo):
    response = echo.get("/nope")
    assert response.status_code == 404 and response.json()["success"] is False
    response = echo.get("/sync")
    assert response.status_code == 405 and response.json()["success"] is False


def test_health_answers_while_loading_and_ready_waits():
    with serve(TEST_RECIPES / "slow_start", env={"FD_TEST_LOAD_SECONDS": "4"}, ready=False) as server:
        deadline_ok = False
        for _ in range(100):
            try:
                if server.get("/health").status_code == 200:
                    deadline_ok = True
                    break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        assert deadline_ok, server.log()
        response = server.get("/ready")
        assert response.status_code == 503 and "not ready" in response.json()["reason"]
        assert response.headers.get("retry-after")
        # a request sent while loading waits and is answered once the loop is ready
        body = server.post("/sync", {"data": [42]}).json()
        assert body["success"] is True and body["prediction"] == [42]
        server.wait_ready()


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "fastdeploy", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fastdeploy ")
    script = subprocess.run(["fastdeploy", "run", "--help"], capture_output=True, text=True)
    assert script.returncode == 0 and "--port" in script.stdout and "TIMEOUT" in script.stdout


def test_bad_recipe_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastdeploy", "run", str(tmp_path / "missing")], capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "predictor.py").write_text("def predictor(x, batch_size=1):\n    return x\n")
    out = subprocess.run([sys.executable, "-m", "fastdeploy", "run", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "example.py is missing" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastdeploy", "run", str(tmp_path), "--port", "x"], capture_output=True, text=True)
    assert out.returncode == 2 and "--port" in out.stderr
