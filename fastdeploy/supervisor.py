"""Start, watch and stop the processes of one fastDeploy service.

The supervisor binds the port once and hands the socket to each API server process,
starts one prediction loop per stage replica, restarts a loop that dies (its leased
jobs go straight back to the queue), and on SIGINT/SIGTERM stops the API servers first
(they answer the /sync requests in flight while the loops still run), then the loops.
Children run in their own session so a terminal's Ctrl-C reaches only the supervisor.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from fastdeploy import store_secret
from fastdeploy.errors import FastDeployError
from fastdeploy.recipe import Recipe
from fastdeploy.settings import Settings
from fastdeploy.store import Store, open_store

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.2
CHECKPOINT_SECONDS = 0.2  # how often the store's write-ahead log is folded in, off the request path
LOOP_STOP_SECONDS = 30.0
MAX_RESTART_DELAY = 30.0


@dataclass
class Child:
    """One supervised process and how to start it again."""

    role: str  # "api" or "loop"
    stage: Optional[int] = None
    worker_id: Optional[str] = None
    proc: Optional[subprocess.Popen[bytes]] = None
    sock: Optional[socket.socket] = None  # an API server's own listening socket (SO_REUSEPORT)
    failures: int = 0
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)


_REUSE_PORT: Optional[int] = getattr(socket, "SO_REUSEPORT", None)


def new_worker_id(stage: int) -> str:
    return f"{socket.gethostname()}-s{stage}-{uuid.uuid4().hex[:8]}"


class Supervisor:
    """Runs API servers and/or prediction loops for one recipe until told to stop."""

    def __init__(
        self,
        settings: Settings,
        recipe: Recipe,
        *,
        serve_api: bool,
        run_loops: bool,
        stages: Optional[Sequence[int]] = None,
    ) -> None:
        self.settings = settings
        self.recipe = recipe
        self.serve_api = serve_api
        self.run_loops = run_loops
        self.stages = list(range(recipe.stages)) if stages is None else list(stages)
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._store: Optional[Store] = None
        self._announced_ready = False
        self._metrics_dir: Optional[Path] = None

    # -- public ---------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def _reload(self, *_: object) -> None:
        """SIGHUP: the API servers re-read the API keys file (each handles its own SIGHUP)."""
        for child in self.children:
            if child.role == "api" and child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    def run(self) -> int:
        # before anything starts: a chain on a broker without a secret stops here; the embedded
        # store's secret is generated (or read back) here and reaches the children in their environment
        self.settings = store_secret.resolve(self.settings, self.recipe)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self._reload)
        self._store = open_store(self.settings.broker, self.settings.state_path)
        try:
            if self.serve_api:  # first: a second instance on a taken port must not touch the first's jobs
                self._bind()
            if self.run_loops and not self.settings.broker:
                self._release_previous_workers()
            if self.serve_api:
                self._fresh_metrics_dir()
            checkpoints = threading.Thread(target=self._checkpoint_forever, name="checkpoint", daemon=True)
            checkpoints.start()
            self._start_children()
            while not self._stop.wait(WATCH_SECONDS):
                self._watch()
            self._shutdown()
            checkpoints.join(timeout=5)
        finally:
            self._stop.set()  # ends the checkpoint thread before the store closes
            if self._listener is not None:
                self._listener.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._store.close()
        return 0

    def _checkpoint_forever(self) -> None:
        """Keep the store's log short from here, so no request pays for flushing it to disk."""
        assert self._store is not None
        while not self._stop.wait(CHECKPOINT_SECONDS):
            try:
                self._store.checkpoint()
            except FastDeployError as exc:  # the request connections' backstop still bounds the log
                log.warning("%s", exc.reason)

    def _fresh_metrics_dir(self) -> None:
        """An empty folder through which the API processes sum their request metrics."""
        folder = self.settings.state_path / f"metrics-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._metrics_dir = folder

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener is not None else self.settings.port

    # -- start ----------------------------------------------------------------
    def _release_previous_workers(self) -> None:
        """Embedded store: loops of an earlier run of this state folder are gone; requeue their jobs."""
        assert self._store is not None
        for worker in self._store.workers():
            count = self._store.release_worker(worker.worker_id)
            if count:
                log.info("requeued %d job(s) held by %s before the restart", count, worker.worker_id)

    def _bind(self) -> None:
        """Take the port once, here, so a taken port fails at start and port 0 picks one.

        Where the OS has SO_REUSEPORT, this socket only holds the port: every API server
        gets a listening socket of its own on it (``_api_socket``), and the kernel spreads
        new connections evenly over them. One shared socket would let whichever server
        wakes first accept a whole burst of connections (asyncio accepts up to 100 per
        wake-up); with keep-alive clients that imbalance lasts: 13 of 16 connections on
        one of two servers was measured here.
        """
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        port = self.settings.port
        if _REUSE_PORT is not None:
            # a plain bind first: SO_REUSEPORT alone would let a second fastDeploy on this
            # port join the first one's sockets and take half of its connections
            probe = socket.socket(family, socket.SOCK_STREAM)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.settings.host, port))
                port = probe.getsockname()[1]
            except OSError as exc:
                raise FastDeployError(self._port_taken(exc)) from None
            finally:
                probe.close()
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _REUSE_PORT is not None:
            listener.setsockopt(socket.SOL_SOCKET, _REUSE_PORT, 1)
        try:
            listener.bind((self.settings.host, port))
        except OSError as exc:
            listener.close()
            raise FastDeployError(self._port_taken(exc)) from None
        if _REUSE_PORT is None:
            listener.listen(4096)
            listener.set_inheritable(True)
        self._listener = listener
        log.info("fastDeploy: serving %r on http://%s:%d", self.recipe.name, self.settings.host, self.port)

    def _port_taken(self, exc: OSError) -> str:
        return (f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror or exc}); "
                "another program (or another fastDeploy) uses it: stop it or choose --port")

    def _api_socket(self) -> socket.socket:
        """The socket an API server accepts on: its own where SO_REUSEPORT exists, else the shared one."""
        assert self._listener is not None
        if _REUSE_PORT is None:
            return self._listener
        sock = socket.socket(self._listener.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, _REUSE_PORT, 1)
        sock.bind((self.settings.host, self.port))
        sock.listen(4096)
        sock.set_inheritable(True)
        return sock

    def _close_api_socket(self, child: Child) -> None:
        """Drop this process's copy of an API server's own socket (the shared one stays)."""
        if child.sock is not None and child.sock is not self._listener:
            child.sock.close()
        child.sock = None

    def _start_children(self) -> None:
        if self.run_loops:
            for stage in self.stages:
                for _ in range(self.settings.replicas):
                    self.children.append(Child("loop", stage=stage))
        if self.serve_api:
            for _ in range(self.settings.api_processes):
                self.children.append(Child("api"))
        for child in self.children:
            self._spawn(child)

    def _command(self, child: Child) -> list[str]:
        base = [sys.executable, "-m", "fastdeploy"]
        if child.role == "api":
            assert child.sock is not None
            command = [*base, "_api", str(self.recipe.path), "--fd", str(child.sock.fileno())]
            if self._metrics_dir is not None:
                command += ["--metrics-dir", str(self._metrics_dir)]
            return command
        return [*base, "_loop", str(self.recipe.path), "--stage", str(child.stage), "--worker-id", str(child.worker_id)]

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self.settings.to_env(), "FASTDEPLOY_SUPERVISED": "1"}
        if child.role == "api":
            del env["FASTDEPLOY_STORE_SECRET"]  # only the loops sign and check stage payloads
        if child.role == "loop":
            assert child.stage is not None
            child.worker_id = new_worker_id(child.stage)
        fds: tuple[int, ...] = ()
        if child.role == "api":
            child.sock = self._api_socket()
            fds = (child.sock.fileno(),)
        try:
            child.proc = subprocess.Popen(
                self._command(child), env=env, cwd=str(self.recipe.path), pass_fds=fds, start_new_session=True
            )
        finally:
            # the API server holds its socket alone: when it dies the kernel closes the socket
            # at once and sends new connections to the live servers only
            self._close_api_socket(child)
        child.started_at = time.monotonic()
        log.debug("started %s (pid %d)", child.role, child.proc.pid)

    # -- watch ----------------------------------------------------------------
    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.failures = 0
                continue
            if child.restart_at == 0.0:
                self._on_death(child, code)
            if now >= child.restart_at:
                child.restart_at = 0.0
                self._spawn(child)
        if not self._announced_ready and self.run_loops:
            self._announce_ready()

    def _on_death(self, child: Child, code: int) -> None:
        delay = min(MAX_RESTART_DELAY, 0.5 * (2**child.failures))
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        if child.role == "loop" and child.worker_id is not None and self._store is not None:
            try:
                requeued = self._store.release_worker(child.worker_id)
            except FastDeployError as exc:  # store down: the lease runs out instead
                log.warning("could not requeue jobs of %s: %s", child.worker_id, exc.reason)
                requeued = 0
            log.error(
                "prediction loop for stage %s exited with code %s; %d job(s) requeued; restarting in %.1f s",
                child.stage, code, requeued, delay,
            )
        else:
            log.error("API server exited with code %s; restarting in %.1f s", code, delay)

    def _announce_ready(self) -> None:
        assert self._store is not None
        try:
            workers = self._store.workers()
        except FastDeployError:  # not essential; try on the next tick
            return
        ready = {w.stage for w in workers if w.ready and any(c.worker_id == w.worker_id for c in self.children)}
        if all(stage in ready for stage in self.stages):
            self._announced_ready = True
            sizes = {w.stage: w.batch_size for w in workers if w.ready}
            log.info("fastDeploy: ready (batch sizes by stage: %s)", sizes)

    # -- stop -----------------------------------------------------------------
    def _shutdown(self) -> None:
        log.info("fastDeploy: stopping")
        apis = [c for c in self.children if c.role == "api"]
        loops = [c for c in self.children if c.role == "loop"]
        self._stop_group(apis, self.settings.timeout + 10.0)
        self._stop_group(loops, LOOP_STOP_SECONDS)
        if self._store is not None:
            for child in loops:
                if child.worker_id is not None:
                    try:
                        self._store.release_worker(child.worker_id)
                    except FastDeployError as exc:  # the store may be gone already
                        log.warning("could not release %s: %s", child.worker_id, exc.reason)

    @staticmethod
    def _stop_group(children: Sequence[Child], grace: float) -> None:
        """Ask (SIGTERM), wait up to ``grace`` seconds, then tell (SIGKILL)."""
        running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0f s; killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
