"""Faults: one failing input fails only its request; timeouts; a dying loop; a restarted service."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import TEST_RECIPES, serve


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    env = {"BATCH_SIZE": "16", "FASTDEPLOY_MAX_WAIT": "50", "FD_TEST_CRASH_MARKER": str(marker)}
    with serve(TEST_RECIPES / "faulty", env=env) as server:
        yield server


def test_failing_input_fails_only_its_request(faulty):
    bodies = [{"data": ["a", "b"]}, {"data": ["c", "boom", "d"]}, {"data": [1]}, {"data": ["e"]}, {"data": ["boom"]}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: faulty.post("/sync", b), bodies))
    assert [r.status_code for r in responses] == [200, 500, 200, 200, 500]
    assert responses[0].json()["prediction"] == ["a", "b"]
    failed = responses[1].json()
    assert failed["success"] is False
    assert "input 1" in failed["reason"] and "ValueError" in failed["reason"] and "boom" in failed["reason"]
    assert responses[4].json()["reason"].startswith("the predictor failed on input 0")
    unique_id = failed["unique_id"]
    result = faulty.post("/result", {"unique_id": unique_id}).json()
    assert result["status"] == "failed" and result["success"] is False and "ValueError" in result["reason"]


def test_failing_async_job_shows_failed(faulty):
    unique_id = faulty.post("/async", {"data": ["boom"]}).json()["unique_id"]
    result = faulty.wait_result(unique_id)
    assert result == {"unique_id": unique_id, "status": "failed", "success": False, "reason": result["reason"]}


def test_wrong_number_of_outputs_is_a_clear_failure(faulty):
    response = faulty.post("/sync", {"data": ["x", "short"]})
    assert response.status_code == 500
    assert "outputs for" in response.json()["reason"] and "one per input" in response.json()["reason"]
    assert faulty.post("/sync", {"data": ["fine"]}).json()["prediction"] == ["fine"]


def test_numpy_outputs_just_work(faulty):
    body = faulty.post("/sync", {"data": ["numpy"]}).json()
    assert body["prediction"] == [{"scalar": 1.5, "array": [0, 1, 2], "int": 7}]


def test_unencodable_output_is_a_clear_failure(faulty):
    response = faulty.post("/sync", {"data": ["object", "ok"]})
    assert response.status_code == 500
    assert "cannot be encoded as JSON" in response.json()["reason"] and "Opaque" in response.json()["reason"]


def test_dead_loop_is_restarted_and_its_jobs_predicted_again(faulty):
    before = faulty.get("/meta").json()["stages"][0]["workers"][0]["pid"]
    response = faulty.post("/sync", {"data": ["crash", "after"]}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["prediction"] == ["crash", "after"]
    deadline = time.monotonic() + 30
    while True:
        workers = faulty.get("/meta").json()["stages"][0]["workers"]
        if workers and workers[0]["pid"] != before:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    assert "exited with code 3" in faulty.log() and "1 job(s) requeued" in faulty.log()


def test_sync_timeout_is_504_and_the_job_is_not_predicted(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "2", "BATCH_SIZE": "1", "TIMEOUT": "1"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        server.post("/async", {"data": ["occupy"]})
        time.sleep(0.2)
        response = server.post("/sync", {"data": ["gave-up"]})
        assert response.status_code == 504
        body = response.json()
        assert body["success"] is False and "TIMEOUT" in body["reason"]
        time.sleep(2.5)  # the loop finishes "occupy" and then must skip the abandoned job
        result = server.post("/result", {"unique_id": body["unique_id"]}).json()
        assert result["status"] == "failed" and "timed out" in result["reason"]
        predicted = [json.loads(line)["inputs"] for line in log.read_text().splitlines()]
        assert predicted == [["occupy"]]


def test_graceful_stop_answers_in_flight_sync_and_leaves_no_process(tmp_path):
    env = {"FD_TEST_SLEEP": "1.5", "BATCH_SIZE": "4"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        children = server.children()
        assert len(children) == 2  # one API server, one loop
        answers = []
        thread = threading.Thread(target=lambda: answers.append(server.post("/sync", {"data": ["in-flight"]})))
        thread.start()
        time.sleep(0.5)
        assert server.stop(signal.SIGTERM) == 0
        thread.join(10)
        assert answers and answers[0].status_code == 200
        assert answers[0].json()["prediction"][0]["echo"] == "in-flight"
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_accepted_async_jobs_survive_a_crash_of_the_whole_service(tmp_path):
    state = tmp_path / "state"
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "0.3", "BATCH_SIZE": "2"}
    with serve(TEST_RECIPES / "slow", env=env, state_dir=state) as server:
        ids = [server.post("/async", {"data": [f"job{i}"]}).json()["unique_id"] for i in range(10)]
        time.sleep(0.4)
        for pid in server.children():  # kill -9 everything, the supervisor last
            os.kill(pid, signal.SIGKILL)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
    with serve(TEST_RECIPES / "slow", env=env, state_dir=state) as server:
        results = [server.wait_result(unique_id) for unique_id in ids]
    assert [r["prediction"][0]["echo"] for r in results] == [f"job{i}" for i in range(10)]
    assert all(r["status"] == "done" for r in results)


def test_state_folder_defaults_inside_the_recipe(tmp_path):
    recipe = tmp_path / "mine"
    recipe.mkdir()
    (recipe / "predictor.py").write_text("def predictor(inputs, batch_size=1):\n    return inputs\n")
    (recipe / "example.py").write_text("example = [1]\n")
    env = {"FASTDEPLOY_STATE_DIR": ""}
    with serve(recipe, env=env) as server:
        assert server.post("/sync", {"data": [1]}).json()["success"] is True
        assert (recipe / ".fastdeploy" / "jobs.sqlite3").exists()


def test_full_queue_answers_503_with_retry_after_and_recovers(tmp_path):
    env = {"FD_TEST_SLEEP": "0.5", "BATCH_SIZE": "1", "FASTDEPLOY_QUEUE_LIMIT": "3"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        accepted = [server.post("/async", {"data": [i]}) for i in range(3)]
        assert all(r.status_code == 200 for r in accepted)
        refused = server.post("/async", {"data": ["one too many"]})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["success"] is False and "queue is full" in refused.json()["reason"]
        for response in accepted:
            server.wait_result(response.json()["unique_id"])
        time.sleep(1.0)  # the next snapshot sees the queue drained
        assert server.post("/sync", {"data": ["after"]}).status_code == 200


def test_only_async_refuses_sync(tmp_path):
    with serve(TEST_RECIPES / "slow", env={"ONLY_ASYNC": "1", "FD_TEST_SLEEP": "0"}) as server:
        response = server.post("/sync", {"data": [1]})
        assert response.status_code == 400 and "ONLY_ASYNC" in response.json()["reason"]
        assert server.post("/async", {"data": [1]}).status_code == 200


def test_a_sync_client_that_leaves_is_not_predicted_for(tmp_path):
    import socket

    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "1.0", "BATCH_SIZE": "1"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        server.post("/async", {"data": ["occupy"]})
        time.sleep(0.2)
        body = json.dumps({"data": ["left"]}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # queued behind "occupy"; then the client hangs up
        time.sleep(2.0)
        predicted = [json.loads(line)["inputs"] for line in log.read_text().splitlines()]
        assert predicted == [["occupy"]]
        assert server.post("/sync", {"data": ["next"]}).json()["prediction"][0]["echo"] == "next"


def test_a_client_that_leaves_halfway_through_its_body_breaks_nothing():
    import socket

    from tests.helpers import RECIPES

    with serve(RECIPES / "echo") as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as conn:
                conn.sendall(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"data\": [")
                time.sleep(0.1)  # the server has the headers and part of the body; then the client is gone
        assert server.post("/sync", {"data": ["after"]}).json()["prediction"] == ["after"]
        assert "unexpected error" not in server.log() and "Traceback" not in server.log()
        assert 'fastdeploy_requests_total{endpoint="sync",status="200"} 1.0' in server.get("/metrics").text
