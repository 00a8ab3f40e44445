"""Uploads cut half-way by kill -9 of their API server, through the real CLI: removed within seconds
while the service runs, and at the next start-up after the whole service was killed; never an upload
that is still being sent, not even by a sibling API server's sweep."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

from fastdeploy import uploads
from fastdeploy.service import SWEEP_SECONDS
from tests.helpers import Server, make_file_recipe, serve, wait_until

GONE = "removed 1 upload(s) left half-way by an API server that is gone"
PART = b'--XyZ\r\nContent-Disposition: form-data; name="half.bin"; filename="half.bin"\r\n\r\n'


def start_half_upload(server: Server) -> socket.socket:
    """A 1 MiB upload of which 200 KB are sent, then nothing: the connection stays open."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /async HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
                 b"Content-Length: %d\r\n\r\n" % (1024 * 1024) + PART + os.urandom(200_000))
    return sock


def half_uploads(state: Path) -> list[Path]:
    return sorted((state / "files" / uploads.INCOMING).rglob("half.bin"))


def receiving(server: Server, upload: Path) -> int:
    """The API server process that has the upload's file open (it is receiving it)."""
    def holder() -> int:
        for pid in api_pids(server):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.path.realpath(fd) == str(upload.resolve()):
                    return pid
        return 0

    return int(wait_until(holder, 10, "the API server receiving the upload"))


def api_pids(server: Server) -> list[int]:
    return [p for p in server.children() if b"_api" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_an_upload_cut_by_kill_9_of_its_api_server_goes_within_seconds_while_the_service_runs(tmp_path):
    recipe = make_file_recipe(tmp_path / "recipe")
    state = tmp_path / "state"
    with serve(recipe, state_dir=state, env={"WORKERS": "2"}) as server:
        sock = start_half_upload(server)
        (upload,) = wait_until(lambda: half_uploads(state), 10, "the half upload on disk")
        pid = receiving(server, upload)
        time.sleep(SWEEP_SECONDS + 1.5)  # both API servers swept meanwhile: a live upload stays
        assert half_uploads(state) == [upload]
        os.kill(pid, signal.SIGKILL)
        # the other API server, or the restarted one as it starts, proves its owner gone: not an hour later
        wait_until(lambda: not upload.exists(), 15, "the half upload to be removed")
        wait_until(lambda: GONE in server.log(), 5, "the log line saying so")  # written just after
        sock.close()
        wait_until(lambda: len(api_pids(server)) == 2 and pid not in api_pids(server), 30, "the restarted API server")
        server.wait_ready()
        done = server.post("/sync", data=PART + b"abc\r\n--XyZ--\r\n",
                           headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert done.status_code == 200 and done.json()["prediction"]["half.bin"]["size"] == 3, done.text
        assert "Traceback" not in server.log()


def test_an_upload_cut_by_kill_9_of_the_whole_service_goes_at_the_next_start(tmp_path):
    recipe = make_file_recipe(tmp_path / "recipe")
    state = tmp_path / "state"
    with serve(recipe, state_dir=state) as first:
        sock = start_half_upload(first)
        (upload,) = wait_until(lambda: half_uploads(state), 10, "the half upload on disk")
        everyone = [first.proc.pid, *first.children()]
        for pid in everyone:  # a power cut of the service: nothing of it lives on
            os.kill(pid, signal.SIGKILL)
        first.proc.wait(10)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in everyone[1:]), 10, "every process gone")
        sock.close()
    time.sleep(1)
    assert half_uploads(state) == [upload]  # nobody was left to remove it
    with serve(recipe, state_dir=state) as second:
        wait_until(lambda: not upload.exists(), 10, "the half upload to be removed at start-up")
        wait_until(lambda: GONE in second.log(), 5, "the log line saying so")
        assert not half_uploads(state)


def test_another_hosts_incoming_folder_goes_once_its_owner_is_silent_for_the_abandoned_age(tmp_path):
    """A files root shared with other hosts (--files-dir): their locks mean nothing here, so their
    folders go by the age of the owner file, which their live processes renew at every sweep."""
    root = tmp_path / "files"
    other = root / uploads.INCOMING / "elsewhere-7-abc"
    (other / "tmp1").mkdir(parents=True)
    (other / "tmp1" / uploads.MARKER).touch()
    (other / "tmp1" / "half.bin").write_bytes(b"x" * 10)
    owner = other / uploads.OWNER_FILE
    owner.write_text(json.dumps({"host": "elsewhere", "boot": "another-kernel", "pid": 7}))

    async def finished(ids: list[str]) -> set[str]:
        return set(ids)

    now = time.time()
    assert asyncio.run(uploads.sweep(root, finished, now + uploads.ABANDONED_SECONDS - 10)) == 0
    assert other.exists()  # its lock is free here, but it is another host's lock: not a proof
    assert asyncio.run(uploads.sweep(root, finished, now + uploads.ABANDONED_SECONDS + 10)) == 1
    assert not other.exists()
    assert uploads.ABANDONED_SECONDS <= 5 * uploads.IDLE_SECONDS  # minutes, not an hour
