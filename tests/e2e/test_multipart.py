"""Multipart uploads (curl -F) on FILE recipes, through the real CLI: files streamed to disk, the
predictor given their paths, limits checked while streaming, nothing left behind, and both ways
files travel with Redis (a shared --files-dir, or inside the job)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from fastdeploy import uploads
from tests.helpers import RECIPES, Server, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, Receiver

PREDICTOR = """\
import hashlib, os, time


def predictor(inputs, batch_size=1):
    out = []
    for path in inputs:
        data = open(path, 'rb').read()
        if data.startswith(b'sleep'):
            time.sleep(float(data[5:]))
        out.append({'path': path, 'name': os.path.basename(path), 'size': len(data),
                    'sha256': hashlib.sha256(data).hexdigest()})
    return out
"""


def _recipe(folder: Path) -> Path:
    (folder / "examples").mkdir(parents=True)
    (folder / "examples" / "a.txt").write_bytes(b"example")
    (folder / "example.py").write_text('input_type = "file"\nexample = ["examples/a.txt"]\n')
    (folder / "predictor.py").write_text(PREDICTOR)
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _recipe(tmp_path_factory.mktemp("multipart") / "hasher")


LIMITS = ["--max-file-mb", "1", "--max-upload-mb", "2"]


@pytest.fixture(scope="module")
def server(recipe: Path) -> Iterator[Server]:
    with serve(recipe, args=[*LIMITS, *ALLOW_LOCAL]) as started:  # webhooks to a local receiver
        yield started


def left_files(server: Server) -> list[str]:
    """Every file (not folder) under the state folder's files/: what an upload left behind."""
    return uploaded_files(server.state_dir / "files")


def uploaded_files(root: Path) -> list[str]:
    """Every file under a files root but the API servers' own owner files (one per live process)."""
    return [str(Path(d) / f) for d, _, names in os.walk(root) for f in names if f != uploads.OWNER_FILE]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_files_arrive_as_paths_keyed_like_curl(server: Server) -> None:
    a, b = os.urandom(300_000), b"second file"
    files = [("a.png", ("a.png", a, "image/png")), ("image", ("cat.jpg", b, "image/jpeg"))]
    response = httpx.post(server.url + "/sync", files=files, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    prediction = body["prediction"]
    assert list(prediction) == ["a.png", "image"]  # the field name is the key, in the order sent
    assert prediction["a.png"]["sha256"] == sha(a) and prediction["a.png"]["size"] == len(a)
    assert prediction["image"]["name"] == "cat.jpg" and prediction["image"]["sha256"] == sha(b)  # the file's name
    folder = Path(prediction["a.png"]["path"]).parent
    assert folder.resolve() == (server.state_dir / "files" / body["unique_id"]).resolve()  # no copy: where it landed
    # the job's folder goes once its outcome is recorded
    wait_until(lambda: not folder.exists() and not left_files(server), 10, "the upload's folder to be deleted")


def test_base64_json_keeps_working(server: Server) -> None:
    import base64

    response = httpx.post(server.url + "/sync", json={"data": {"x.bin": base64.b64encode(b"hello").decode()}})
    assert response.status_code == 200
    assert response.json()["prediction"]["x.bin"]["sha256"] == sha(b"hello")


def test_async_with_form_fields(server: Server) -> None:
    with Receiver() as receiver:
        unique_id = f"upload-{uuid.uuid4().hex[:8]}"
        data = {"webhook": receiver.url + "/ok", "priority": "0", "unique_id": unique_id}
        response = httpx.post(server.url + "/async", files={"doc.pdf": ("doc.pdf", b"%PDF")}, data=data)
        assert response.status_code == 200, response.text
        assert response.json()["unique_id"] == unique_id
        result = server.wait_result(unique_id)
        assert result["prediction"]["doc.pdf"]["sha256"] == sha(b"%PDF")
        (delivered,) = receiver.wait_for("/ok", 1)
        assert delivered["unique_id"] == unique_id and delivered["status"] == "done"
        # the same id again while its result is kept: 409, and its files are not left behind
        again = httpx.post(server.url + "/async", files={"doc.pdf": ("doc.pdf", b"x")}, data={"unique_id": unique_id})
        assert again.status_code == 409, again.text
    wait_until(lambda: not left_files(server), 10, "no files left")


@pytest.mark.parametrize("path, fields, reason", [
    ("/sync", {"webhook": "http://127.0.0.1:9/x"}, "webhook is for /async"),
    ("/async", {"priority": "high"}, "priority must be a whole number"),
    ("/async", {"priority": "12"}, "priority must be a whole number"),
    ("/async", {"unique_id": "has space"}, "unique_id must be"),
    ("/async", {"webhook": "ftp://example.com"}, "webhook must be"),
])
def test_bad_form_fields_are_400_and_leave_nothing(server: Server, path: str, fields: dict[str, str],
                                                   reason: str) -> None:
    response = httpx.post(server.url + path, files={"a.txt": ("a.txt", b"abc")}, data=fields)
    assert response.status_code == 400 and reason in response.json()["reason"], response.text
    assert response.json()["success"] is False
    assert not left_files(server)


def _raw(server: Server, head: bytes, body: bytes, *, close_after: bool = False, timeout: float = 10) -> bytes:
    """Send a request by hand (a body cut short, or a connection dropped); the answer, if one comes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        if close_after:
            return b""
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    length = int(answer.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                    if len(answer.split(b"\r\n\r\n", 1)[1]) >= length:
                        break
        except (ConnectionResetError, socket.timeout):
            pass
        return answer


def _head(length: int | None, boundary: bytes = b"XyZ", path: bytes = b"/sync") -> bytes:
    size = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary
            + b"\r\n" + size + b"\r\n")


def _part(name: str) -> bytes:
    return (b'--XyZ\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n\r\n' % (name.encode(), name.encode()))


def test_one_file_over_the_limit_is_413_before_the_body_ends(server: Server) -> None:
    # 1.5 MiB of a declared 20 MiB body: the answer comes while the rest is still unsent
    start = _part("big.bin") + os.urandom(1536 * 1024)
    answer = _raw(server, _head(2 * 1024 * 1024), start)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_file_mb" in answer
    wait_until(lambda: not left_files(server), 5, "the partial file to be deleted")


def test_files_together_over_the_total_are_413_while_streaming(server: Server) -> None:
    def body() -> Iterator[bytes]:  # chunked: no length to judge by, only the bytes as they come
        for i in range(3):
            yield _part(f"f{i}.bin") + os.urandom(900 * 1024) + b"\r\n"
        yield b"--XyZ--\r\n"

    response = httpx.post(server.url + "/sync", content=body(), timeout=60,
                          headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 413, response.text
    assert "all together (max_upload_mb)" in response.json()["reason"]
    assert not left_files(server)


def test_a_declared_length_over_the_total_is_413_at_once(server: Server) -> None:
    answer = _raw(server, _head(500 * 1024 * 1024), b"")
    assert answer.startswith(b"HTTP/1.1 413") and b"uploads may hold at most" in answer, answer[:200]


def test_a_chunked_upload_over_the_limit_is_413(server: Server) -> None:
    def body() -> Iterator[bytes]:
        yield _part("chunked.bin")
        for _ in range(40):
            yield os.urandom(64 * 1024)
        yield b"\r\n--XyZ--\r\n"

    response = httpx.post(server.url + "/sync", content=body(), timeout=60,
                          headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 413, response.text
    assert not left_files(server)


def test_a_client_leaving_mid_upload_leaves_nothing(server: Server) -> None:
    _raw(server, _head(1_800_000), _part("gone.bin") + os.urandom(700_000), close_after=True)
    wait_until(lambda: not left_files(server), 10, "the abandoned upload to be deleted")
    assert server.get("/health").status_code == 200
    assert "Traceback" not in server.log() and "ERROR" not in server.log()


@pytest.mark.parametrize("content_type, body, reason", [
    ("multipart/form-data", b"--x\r\n", "boundary"),
    ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Disposition: form-data; name="a"; filename="a"\r\n\r\nabc',
     "closing boundary"),
    ("multipart/form-data; boundary=XyZ", b"this is not multipart at all", "malformed"),
    ("multipart/form-data; boundary=XyZ", b"--XyZ--\r\n", "no file"),
    ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Type: text/plain\r\n\r\nabc\r\n--XyZ--\r\n',
     "Content-Disposition"),
    ("multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="a"; filename="x.txt"\r\n\r\n1\r\n'
     b'--XyZ\r\nContent-Disposition: form-data; name="a"; filename="y.txt"\r\n\r\n2\r\n--XyZ--\r\n', "key 'a'"),
    ("multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="../.."; filename="../.."\r\n\r\n1\r\n--XyZ--\r\n',
     "no usable base name"),
    ("multipart/form-data; boundary=XyZ",  # the name of the folder's own marker file (was a 503, retried forever)
     b'--XyZ\r\nContent-Disposition: form-data; name="m"; filename=".fastdeploy-upload"\r\n\r\n1\r\n--XyZ--\r\n',
     "is reserved"),
])
def test_bad_multipart_is_400(server: Server, content_type: str, body: bytes, reason: str) -> None:
    response = httpx.post(server.url + "/sync", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert reason in response.json()["reason"] and response.json()["success"] is False
    assert not left_files(server)


def test_a_json_recipe_refuses_multipart() -> None:
    with serve(RECIPES / "echo") as echo:
        response = httpx.post(echo.url + "/sync", files={"a.txt": ("a.txt", b"abc")})
        assert response.status_code == 400 and "multipart/form-data is for FILE recipes" in response.json()["reason"]


def test_a_queued_job_keeps_its_files_across_a_restart(recipe: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    content = os.urandom(50_000)
    # API servers only (no loop): the job stays queued with its files in the state folder
    with serve(recipe, command="serve", state_dir=state, ready=False) as api:
        wait_until(lambda: _alive(api), 60, "the API server")
        response = httpx.post(api.url + "/async", files={"kept.bin": ("kept.bin", content)})
        assert response.status_code == 200, response.text
        unique_id = response.json()["unique_id"]
    assert (state / "files" / unique_id / "kept.bin").read_bytes() == content
    with serve(recipe, state_dir=state) as full:
        result = full.wait_result(unique_id)
        assert result["prediction"]["kept.bin"]["sha256"] == sha(content)
        wait_until(lambda: not (state / "files" / unique_id).exists(), 10, "the files to go once the job ended")


def _alive(server: Server) -> bool:
    try:
        return server.get("/health").status_code == 200
    except OSError:
        return False


# -- Redis: API server and worker as two processes -------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("shared_folder", [True, False], ids=["files-dir", "through-redis"])
def test_redis_serve_and_worker(recipe: Path, redis_url: str, tmp_path: Path, shared_folder: bool) -> None:
    env = {"FASTDEPLOY_BROKER": redis_url}
    if shared_folder:
        env["FASTDEPLOY_FILES_DIR"] = str(tmp_path / "shared")
    content = os.urandom(400_000)
    with ExitStack() as stack:
        stack.enter_context(serve(recipe, command="worker", env=env, ready=False))
        api = stack.enter_context(serve(recipe, command="serve", env=env, ready_timeout=120))
        response = httpx.post(api.url + "/sync", files={"r.bin": ("r.bin", content)}, timeout=60)
        assert response.status_code == 200, response.text
        out = response.json()["prediction"]["r.bin"]
        assert out["sha256"] == sha(content)
        if shared_folder:  # the worker read the API server's file where it lies, and deleted it after
            assert Path(out["path"]).parent.parent == tmp_path / "shared"
            wait_until(lambda: not uploaded_files(tmp_path / "shared"), 10, "files deleted")
        else:  # carried inside the job: the worker wrote it to its own scratch folder
            assert "fastdeploy-files-" in out["path"]


@pytest.mark.redis
def test_a_worker_without_the_shared_folder_fails_the_job_with_a_reason(
    recipe: Path, redis_url: str, tmp_path: Path,
) -> None:
    api_env = {"FASTDEPLOY_BROKER": redis_url, "FASTDEPLOY_FILES_DIR": str(tmp_path / "shared")}
    with ExitStack() as stack:
        stack.enter_context(serve(recipe, command="worker", env={"FASTDEPLOY_BROKER": redis_url}, ready=False))
        api = stack.enter_context(serve(recipe, command="serve", env=api_env, ready_timeout=120))
        response = httpx.post(api.url + "/sync", files={"r.bin": ("r.bin", b"abc")}, timeout=60)
        assert response.status_code == 500 and "--files-dir" in response.json()["reason"], response.text


@pytest.mark.redis
def test_redis_without_a_folder_bounds_uploads_by_max_body_mb(recipe: Path, redis_url: str) -> None:
    env = {"FASTDEPLOY_BROKER": redis_url, "FASTDEPLOY_MAX_BODY_MB": "1"}
    with ExitStack() as stack:
        stack.enter_context(serve(recipe, command="worker", env=env, ready=False))
        api = stack.enter_context(serve(recipe, command="serve", env=env, ready_timeout=120))
        big = httpx.post(api.url + "/sync", files={"b.bin": ("b.bin", os.urandom(1_200_000))}, timeout=60)
        assert big.status_code == 413 and "max_upload_mb" in big.json()["reason"], big.text


def test_sweep_deletes_folders_of_ended_jobs_only(tmp_path: Path) -> None:
    root = tmp_path / "files"
    for name in ("queued", "ended", "%2E.", ".incoming/abandoned", ".incoming/fresh", "someone-elses"):
        (root / name).mkdir(parents=True)
        (root / name / "f.bin").write_bytes(b"x")
        if name != "someone-elses":  # not made by an upload: never touched
            (root / name / uploads.MARKER).touch()
    now = time.time()
    old = now - uploads.ABANDONED_SECONDS - 10
    for name in ("queued", "ended", "%2E.", ".incoming/abandoned", "someone-elses"):
        for path in (root / name).iterdir():
            os.utime(path, (old, old))
        os.utime(root / name, (old, old))
    asked: list[str] = []

    async def finished(ids: list[str]) -> set[str]:
        asked.extend(ids)
        return {i for i in ids if i != "queued"}

    assert asyncio.run(uploads.sweep(root, finished, now)) == 3
    assert sorted(asked) == sorted(["queued", "ended", ".."])  # %2E. is the folder of job ".."
    assert sorted(p.name for p in root.iterdir()) == [".incoming", "queued", "someone-elses"]
    assert [p.name for p in (root / ".incoming").iterdir()] == ["fresh"]


def test_files_per_request_are_bounded_without_max_per_client_batch(server: Server) -> None:
    # MAX_PER_CLIENT_BATCH is unset here: still at most uploads.MAX_FILES files (each one a file on disk)
    body = b"".join(_part(f"f{i}") + b"x\r\n" for i in range(uploads.MAX_FILES + 1)) + b"--XyZ--\r\n"
    response = httpx.post(server.url + "/async", content=body, timeout=60,
                          headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 413, response.text[:300]
    assert f"more than {uploads.MAX_FILES} files" in response.json()["reason"]
    assert not left_files(server)


@pytest.mark.parametrize("args, status, reason", [
    (["--queue-limit", "1"], b"503", b"the queue is full"),
    (["--queue-limit-per-key", "1"], b"429", b"unfinished jobs, the most one client may have"),
], ids=["queue-full", "per-key"])
def test_a_refused_upload_is_answered_before_its_body_is_read(
    recipe: Path, args: list[str], status: bytes, reason: bytes,
) -> None:
    with serve(recipe, command="serve", args=args, ready=False) as api:  # no loop: the first job stays queued
        wait_until(lambda: _alive(api), 60, "the API server")
        first = httpx.post(api.url + "/async", files={"a.bin": ("a.bin", b"first")})
        assert first.status_code == 200, first.text
        # 10 MiB declared, 1 KiB sent: the refusal comes without waiting for the rest
        answer = _raw(api, _head(10 * 1024 * 1024, path=b"/async"), _part("big.bin") + b"x" * 1024, timeout=5)
        assert answer.startswith(b"HTTP/1.1 " + status) and reason in answer, answer[:300]
        assert sorted(Path(f).name for f in left_files(api)) == [uploads.MARKER, "a.bin"]  # the first job's only


def test_a_files_folder_that_refuses_is_503_with_a_reason_and_leaves_nothing(recipe: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    env = {"FASTDEPLOY_FILES_DIR": str(shared)}
    with serve(recipe, command="serve", env=env, ready=False) as api:
        wait_until(lambda: _alive(api), 60, "the API server")
        shared.mkdir(exist_ok=True)
        (shared / "taken").write_bytes(b"someone else's file")  # the job's folder cannot be made there
        settle = httpx.post(api.url + "/async", files={"a.bin": ("a.bin", b"1")}, data={"unique_id": "taken"})
        assert settle.status_code == 503 and "cannot store the upload here" in settle.json()["reason"], settle.text
        assert str(tmp_path) not in settle.text and settle.headers["retry-after"]
        assert not uploaded_files(shared / ".incoming")  # the upload's folder went with the refusal
        shutil.rmtree(shared)
        shared.write_bytes(b"not a folder")  # no upload folder can be made at all
        setup = httpx.post(api.url + "/async", files={"a.bin": ("a.bin", b"1")})
        assert setup.status_code == 503 and "cannot store the upload here" in setup.json()["reason"], setup.text
        assert str(tmp_path) not in setup.text
        assert "Traceback" not in api.log() and "ERROR" not in api.log()


def _stalling(chunks: list[bytes]) -> uploads.Receive:
    """An ASGI receive that sends ``chunks`` (one every 50 ms), then nothing more, ever."""
    sent = iter(chunks)

    async def receive() -> uploads.Message:
        chunk = next(sent, None)
        if chunk is None:
            await asyncio.Event().wait()
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": chunk, "more_body": True}

    return receive


@pytest.mark.parametrize("python", ["3.11+", "3.9-3.10"])
def test_a_stalled_upload_is_408_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   python: str) -> None:
    if python == "3.9-3.10":  # no asyncio.timeout there: a deadline per chunk instead
        monkeypatch.delattr(asyncio, "timeout")

    async def upload(chunks: list[bytes]) -> None:
        await uploads.receive_upload(b"multipart/form-data; boundary=XyZ", None, _stalling(chunks), tmp_path,
                                     max_file=1 << 20, max_total=1 << 20, max_files=0, idle=0.3)

    steady = [_part("slow.bin")] + [b"x"] * 20  # 1 s of chunks 50 ms apart: never idle for 0.3 s
    started = time.monotonic()
    with pytest.raises(uploads.UploadStalled) as stalled:
        asyncio.run(upload(steady))
    assert stalled.value.status == 408 and "sent nothing for 0.3 s" in stalled.value.reason
    assert 1.2 < time.monotonic() - started < 2.5  # dropped after the silence, not during the steady part
    # this process's own incoming folder holds its owner file only
    assert [p.name for p in (tmp_path / uploads.INCOMING).glob("*/*")] == [uploads.OWNER_FILE]
    uploads.let_go(tmp_path)
    assert list((tmp_path / uploads.INCOMING).iterdir()) == []


def test_the_sweep_skips_what_vanishes_under_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # another API server deletes folders between this one's listing and its stat: no error escapes
    root = tmp_path / "files"
    for name in ("job-a", "job-b", ".incoming/up-1", ".incoming/up-2"):
        (root / name).mkdir(parents=True)
        (root / name / uploads.MARKER).touch()
    listed = os.scandir

    @contextlib.contextmanager
    def scandir_then_delete(path: Path) -> Iterator[list[os.DirEntry[str]]]:
        with listed(path) as entries:
            found = list(entries)
        if isinstance(path, Path):  # the sweep's own listings (not rmtree's, by descriptor)
            for entry in found:
                if entry.name != uploads.INCOMING:
                    shutil.rmtree(entry.path)
        yield found

    monkeypatch.setattr(uploads.os, "scandir", scandir_then_delete)

    async def finished(ids: list[str]) -> set[str]:
        return set(ids)

    assert asyncio.run(uploads.sweep(root, finished, time.time() + 2 * uploads.ABANDONED_SECONDS)) == 0
    shutil.rmtree(root)
    assert asyncio.run(uploads.sweep(root, finished, time.time())) == 0  # the whole root gone
