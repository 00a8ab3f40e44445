"""A slow --files-dir (a network file system, say) through the real CLI: while an upload is being
written there, /health and a JSON /sync on the same API server process answer at once. The slow
disk is real: a small C library, preloaded into the service's processes, sleeps in every file-system
call on a path under a marked folder, as a stalled NFS server would."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

from tests.helpers import Server, make_file_recipe, serve

MARK = "slowdisk-e2e-7c1f"  # every path holding this name is slow (tmp_path never holds it by chance)
SLOW_SECONDS = 0.4  # per file-system call there
BOUND_SECONDS = 0.2  # what /health and a JSON /sync may take meanwhile: half of one slow call

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static const char *mark;
static long nap_ns = 300000000L;
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_mkdir)(const char *, mode_t);
static int (*real_close)(int);
static int (*real_rename)(const char *, const char *);

#define REAL(name) (real_##name ? real_##name : (real_##name = dlsym(RTLD_NEXT, #name)))

__attribute__((constructor)) static void init(void) {
    const char *ms = getenv("SLOWFS_MS");
    mark = getenv("SLOWFS_MARK");
    if (ms) nap_ns = atol(ms) * 1000000L;
    REAL(write); REAL(writev); REAL(open); REAL(open64); REAL(openat); REAL(mkdir); REAL(close); REAL(rename);
}

static void nap(void) {
    int saved = errno;
    struct timespec left = {nap_ns / 1000000000L, nap_ns % 1000000000L};
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {}
    errno = saved;
}

static int marked(const char *path) { return mark && *mark && path && strstr(path, mark); }

static int marked_fd(int fd) {  /* no snprintf: this runs between fork and exec too */
    char link[40] = "/proc/self/fd/", digits[12], path[4096];
    int n = 0, len = 14, saved = errno;
    unsigned v = (unsigned)fd;
    if (fd < 0) return 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) link[len++] = digits[--n];
    link[len] = 0;
    ssize_t got = readlink(link, path, sizeof path - 1);
    errno = saved;
    if (got <= 0) return 0;
    path[got] = 0;
    return marked(path);
}

static mode_t mode_of(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

ssize_t write(int fd, const void *buf, size_t n) { if (marked_fd(fd)) nap(); return REAL(write)(fd, buf, n); }
ssize_t writev(int fd, const struct iovec *v, int n) { if (marked_fd(fd)) nap(); return REAL(writev)(fd, v, n); }
int close(int fd) { if (marked_fd(fd)) nap(); return REAL(close)(fd); }
int mkdir(const char *p, mode_t m) { if (marked(p)) nap(); return REAL(mkdir)(p, m); }
int rename(const char *a, const char *b) { if (marked(a) || marked(b)) nap(); return REAL(rename)(a, b); }

int open(const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_of(flags, ap); va_end(ap);
    if (marked(p)) nap();
    return REAL(open)(p, flags, m);
}

int open64(const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_of(flags, ap); va_end(ap);
    if (marked(p)) nap();
    return REAL(open64)(p, flags, m);
}

int openat(int dir, const char *p, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_of(flags, ap); va_end(ap);
    if (marked(p) || marked_fd(dir)) nap();
    return REAL(openat)(dir, p, flags, m);
}
"""


@pytest.fixture(scope="module")
def slow_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled library (skipped where there is no C compiler or no /proc/self/fd to tell paths by)."""
    if shutil.which("gcc") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs gcc and Linux to build the slow file system (an LD_PRELOAD library)")
    folder = tmp_path_factory.mktemp("slowfs")
    (folder / "slowfs.c").write_text(SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-U_FORTIFY_SOURCE", "-o", str(folder / "slowfs.so"),
                    str(folder / "slowfs.c"), "-ldl"], check=True, capture_output=True)
    return folder / "slowfs.so"


@pytest.fixture()
def server(slow_disk: Path, tmp_path: Path) -> Iterator[Server]:
    recipe = make_file_recipe(tmp_path / "recipe")
    files = tmp_path / MARK / "files"
    env = {"LD_PRELOAD": str(slow_disk), "SLOWFS_MARK": MARK, "SLOWFS_MS": str(int(SLOW_SECONDS * 1000))}
    with serve(recipe, args=["--files-dir", str(files)], env=env) as started:  # one API server process
        yield started


class Upload(threading.Thread):
    """A multipart /async upload sent a chunk at a time, for about a second, by a client of its own."""

    CHUNKS = [os.urandom(64 * 1024) for _ in range(40)]  # 2.5 MiB: more than one batch for the disk threads

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.url = server.url + "/async"
        self.response: Optional[httpx.Response] = None
        self.ended = float("inf")

    def body(self) -> Iterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="big.bin"; filename="big.bin"\r\n\r\n'
        for chunk in self.CHUNKS:
            time.sleep(0.025)
            yield chunk
        yield b"\r\n--XyZ--\r\n"

    def run(self) -> None:
        self.response = httpx.post(self.url, content=self.body(), timeout=120,
                                   headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        self.ended = time.monotonic()


def probe(client: httpx.Client, server: Server, which: str) -> tuple[float, float]:
    """(when it was answered, how long it took) of one /health or one JSON /sync."""
    started = time.monotonic()
    if which == "/health":
        response = client.get(server.url + "/health")
    else:
        response = client.post(server.url + "/sync", json={"data": {"a.txt": base64.b64encode(b"hi").decode()}})
    assert response.status_code == 200, response.text
    ended = time.monotonic()
    return ended, ended - started


def test_a_slow_files_dir_delays_neither_health_nor_a_json_sync_while_an_upload_is_written(server: Server) -> None:
    with httpx.Client(timeout=60) as client:
        probe(client, server, "/sync")  # warm: the connection, the loop's first job
        upload = Upload(server)
        started = time.monotonic()
        upload.start()
        timings: dict[str, list[tuple[float, float]]] = {"/health": [], "/sync": []}
        while upload.is_alive():
            for which in timings:
                timings[which].append(probe(client, server, which))
            time.sleep(0.01)
        upload.join()
    assert upload.response is not None and upload.response.status_code == 200, upload.response
    assert upload.ended - started >= 3 * SLOW_SECONDS  # the disk was slow indeed: the upload waited for it
    for which, answered in timings.items():
        # those answered before the upload was (its job then reads its file on the slow disk, in the loop)
        taken = [seconds for ended, seconds in answered if ended < upload.ended]
        assert max(taken, default=0.0) < BOUND_SECONDS, f"{which} took {max(taken):.3f} s while an upload was written"
        assert len(taken) >= 5, (which, answered)  # they did overlap the upload
    result = server.wait_result(upload.response.json()["unique_id"], timeout=60)
    assert result["success"] is True, result
    assert result["prediction"]["big.bin"]["sha256"] == hashlib.sha256(b"".join(Upload.CHUNKS)).hexdigest()
