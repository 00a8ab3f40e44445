"""Start, watch and stop the processes of one fastDeploy service.

The supervisor binds the port once and hands the socket to each API server process,
starts one prediction loop per stage replica, restarts a loop that dies (its leased
jobs go straight back to the queue), and on SIGINT/SIGTERM stops the API servers first
(they answer the /sync requests in flight while the loops still run), then the loops.
Children run in their own session so a terminal's Ctrl-C reaches only the supervisor.

A loop whose predictor cannot start (the recipe's own error at import or warm-up: exit
STARTUP_FAILED_EXIT, its one-line reason on a pipe) stops the whole service, unless that
loop slot was ready before: then it is restarted like any dying loop, and once
FAILED_STARTS restarts in a row never got ready, a record in the store tells the API
servers why, so /ready, /sync and /async say it at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from fastdeploy import __version__, devices, jobs, state_folder, store_secret
from fastdeploy.errors import FastDeployError
from fastdeploy.jobs import STARTUP_FAILURE, WorkerInfo
from fastdeploy.recipe import Recipe
from fastdeploy.settings import Settings
from fastdeploy.store import Store, open_store

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.2
CHECKPOINT_SECONDS = 0.2  # how often the store's write-ahead log is folded in, off the request path
LOOP_STOP_SECONDS = 30.0
MAX_RESTART_DELAY = 30.0
STARTUP_FAILED_EXIT = 78  # a loop's exit code when the recipe's own code failed at start-up (EX_CONFIG)
FAILED_STARTS = 3  # restarts in a row that never got ready before the API servers are told why
_METRICS_PREFIX = "fastdeploy-metrics-"  # + supervisor pid: the API servers' metric files, outside the state folder


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
    report_fd: Optional[int] = None  # a loop's pipe: why its predictor could not start
    ready: bool = False  # this process reported itself ready
    ever_ready: bool = False  # some process of this slot did: its deaths are restarted, never fatal
    failed_starts: int = 0  # processes in a row that died before they were ready
    placement: Optional[devices.Placement] = None  # a loop's device and the variables that put it there


_SECRETS_OF_THE_OTHER_ROLE = {
    "api": (),  # the store secret too, unless it signs job records (a broker: ``store_secret.for_jobs``)
    "loop": ("FASTDEPLOY_API_KEYS", "FASTDEPLOY_API_KEYS_FILE", "FASTDEPLOY_WEBHOOK_SECRET"),
}
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
        self._started = time.monotonic()  # for "ready in N s"
        self._metrics_dir: Optional[Path] = None
        self._fatal: Optional[str] = None  # why the service stops by itself (a predictor that cannot start)
        self._failing: dict[int, str] = {}  # stage -> why its loops keep failing to start
        self._failure_written = 0.0
        self._folder: Optional[state_folder.FolderLock] = None  # the embedded store's folder, held while running

    # -- public ---------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def _upgrade_store(self) -> None:
        """Jobs an earlier version left queued are queued again in this version's layout before
        anything serves; a store that is down now is the children's to wait for."""
        assert self._store is not None
        stage_secret = self.settings.store_secret  # given, or the state folder's (resolved for loops)
        resign = functools.partial(jobs.upgraded_payload, stage_secret=stage_secret,
                                   job_secret=store_secret.for_jobs(self.settings)) if stage_secret else None
        try:
            self._store.upgrade(resign)
        except FastDeployError as exc:
            log.warning("could not look for jobs of an earlier version in the store: %s", exc.reason)

    def _reload(self, *_: object) -> None:
        """SIGHUP: the API servers re-read the API keys file (each handles its own SIGHUP)."""
        if not self.settings.api_keys_file:
            log.info("SIGHUP ignored: there is no --api-keys-file to re-read")
            return
        for child in self.children:
            if child.role == "api" and child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    def run(self) -> int:
        # before anything starts: a chain on a broker without a secret stops here; the embedded
        # store's secret is generated (or read back) here and reaches the children in their environment
        if self.run_loops:  # API servers never sign or read stage payloads
            self.settings = store_secret.resolve(self.settings, self.recipe)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self._reload)
        parts = [("API servers", self.serve_api), ("prediction loops", self.run_loops)]
        log.info("fastDeploy %s: starting %s for %r", __version__, " and ".join(p for p, on in parts if on),
                 self.recipe.name)
        try:
            if self.serve_api:  # first: a second instance on a taken port must not touch the first's jobs
                self._bind()
            if not self.settings.broker:  # nor a second `run` of this state folder on another port
                self._hold_state_folder()
            self._store = open_store(self.settings.broker, self.settings.state_path)
            self._upgrade_store()
            if self.run_loops and self._folder is not None and self._folder.alone:
                self._release_previous_workers()
            if self.serve_api:
                self._fresh_metrics_dir()
            checkpoints = threading.Thread(target=self._checkpoint_forever, name="checkpoint", daemon=True)
            checkpoints.start()
            self._start_children()
            if not self.run_loops:  # API servers only: they answer once loops elsewhere join
                self._announce_urls()
            elif self.serve_api:  # the port is bound and /health answers: where, before the predictors load
                log.info("API:         %s  (not ready yet: /health answers now, /ready once every stage is loaded; "
                         "requests sent meanwhile wait)", self._base_url())
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
            if self._store is not None:
                self._store.close()
            if self._folder is not None:
                self._folder.release()
        if self._fatal is not None:
            raise FastDeployError(self._fatal)  # the CLI prints it and exits non-zero
        return 0

    def _checkpoint_forever(self) -> None:
        """Keep the store's log short from here, so no request pays for flushing it to disk."""
        assert self._store is not None
        said = ""
        while not self._stop.wait(CHECKPOINT_SECONDS):
            try:
                self._store.checkpoint()
                said = ""
            except FastDeployError as exc:  # the request connections' backstop still bounds the log
                if exc.reason != said:  # a full disk fails every pass: say so once, not 5 times a second
                    log.warning("%s", exc.reason)
                    said = exc.reason
            except Exception as exc:  # a thread's top: log it (once per kind of failure), keep checkpointing
                if repr(exc) != said:
                    log.exception("checkpoint failed")
                    said = repr(exc)

    def _fresh_metrics_dir(self) -> None:
        """An empty folder, private to this service (0700), through which the API processes sum their
        request metrics. Not in the state folder: prometheus_client memory-maps these files, and a
        write to a mapped file on a full disk kills the process (SIGBUS); a full state disk must not."""
        _sweep_metrics_dirs()
        self._metrics_dir = Path(tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-"))

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener is not None else self.settings.port

    # -- start ----------------------------------------------------------------
    @property
    def _name(self) -> str:
        """The command this supervisor runs: run, serve or worker."""
        return "run" if self.serve_api and self.run_loops else "serve" if self.serve_api else "worker"

    def _hold_state_folder(self) -> None:
        """Embedded store: the state folder is this service's alone (``state_folder.hold``), until this
        process ends; a second `run` of it stops here, naming this one (pid, port)."""
        self._folder = state_folder.hold(self.settings.state_path, self._name)
        self._folder.announce(self._name, (self.port,) if self.serve_api else ())

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
        log.debug("listening on %s:%d", self.settings.host, self.port)

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
            placements = self._placements()
            for stage in self.stages:
                self.children.extend(Child("loop", stage=stage, placement=p) for p in placements)
        if self.serve_api:
            for _ in range(self.settings.api_processes):
                self.children.append(Child("api"))
        for child in self.children:
            self._spawn(child)

    def _placements(self) -> list[devices.Placement]:
        """Each stage's loop slots, one device each (``--devices``, ``--replicas-per-device``); with no
        ``--threads``, each loop's share of the cores follows from how many loops this host runs."""
        s = self.settings
        found = devices.resolve(s.devices, os.environ)
        placements = devices.plan(found, s.replicas, s.replicas_per_device, os.environ)
        if found.gpus and s.replicas > 1:
            log.warning("--replicas %d counts CPU loops; on GPUs each stage runs --replicas-per-device (%d) "
                        "loops per GPU", s.replicas, s.replicas_per_device)
        if not s.threads:
            loops = len(placements) * len(self.stages)
            self.settings = dataclasses.replace(s, threads=max(1, (os.cpu_count() or 1) // loops))
        log.info("prediction loops per stage: %s (devices: %s)", devices.describe(placements), found.found_by)
        return placements

    def _command(self, child: Child, fd: int) -> list[str]:
        """``fd``: an API server's listening socket, or the end of a loop's report pipe it writes to."""
        base = [sys.executable, "-m", "fastdeploy"]
        if child.role == "api":
            command = [*base, "_api", str(self.recipe.path), "--fd", str(fd)]
            if self._metrics_dir is not None:
                command += ["--metrics-dir", str(self._metrics_dir)]
            return command
        return [*base, "_loop", str(self.recipe.path), "--stage", str(child.stage), "--worker-id", str(child.worker_id),
                "--report-fd", str(fd)]

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self.settings.to_env(), "FASTDEPLOY_SUPERVISED": "1"}
        # each child gets only the secrets it uses: the loops run the recipe's own code
        for name in _SECRETS_OF_THE_OTHER_ROLE[child.role]:
            env.pop(name, None)
        if child.role == "api" and not store_secret.for_jobs(self.settings):  # it signs no job records
            env.pop("FASTDEPLOY_STORE_SECRET", None)
        if child.role == "loop":
            assert child.stage is not None and child.placement is not None
            env.update(child.placement.env)
            child.worker_id = new_worker_id(child.stage)
            child.ready = False
            child.report_fd, fd = os.pipe()
            os.set_blocking(child.report_fd, False)  # read once it died; a grandchild may hold the other end
        else:
            child.sock = self._api_socket()
            fd = child.sock.fileno()
        try:
            child.proc = subprocess.Popen(
                self._command(child, fd), env=env, cwd=str(self.recipe.path), pass_fds=(fd,), start_new_session=True
            )
        finally:
            # the API server holds its socket alone: when it dies the kernel closes the socket
            # at once and sends new connections to the live servers only
            self._close_api_socket(child)
            if child.role == "loop":
                os.close(fd)
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
                if self._fatal is not None:
                    return  # a predictor that cannot start: the service stops, nothing is restarted
            if now >= child.restart_at:
                child.restart_at = 0.0
                self._spawn(child)
        if self.run_loops:
            if any(c.role == "loop" and not c.ready for c in self.children):
                self._see_ready()
            if self._failing and now - self._failure_written >= self.settings.heartbeat_seconds:
                self._write_failures()

    def _on_death(self, child: Child, code: int) -> None:
        delay = min(MAX_RESTART_DELAY, 0.5 * (2**child.failures))
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        if child.role != "loop":
            log.error("API server exited with code %s; restarting in %.1f s", code, delay)
            return
        reason = self._take_report(child)
        if not child.ready:
            self._see_ready()  # it may have got ready since the last look
        if code == STARTUP_FAILED_EXIT and not child.ever_ready:
            # at start-up: the recipe's own code failed, and every restart would fail the same way
            self._fatal = reason or f"the predictor of stage {child.stage} could not start (see above)"
            self._stop.set()
        requeued = self._release(child)
        if self._fatal is not None:
            return
        said = f": {reason}" if reason else ""
        log.error("prediction loop for stage %s exited with code %s%s; %d job(s) requeued; restarting in %.1f s",
                  child.stage, code, said, requeued, delay)
        if not child.ready:
            self._failed_start(child, reason or _exit_description(code))

    def _release(self, child: Child) -> int:
        """Requeue the jobs a dead loop held; how many."""
        if child.worker_id is None or self._store is None:
            return 0
        try:
            return self._store.release_worker(child.worker_id)
        except FastDeployError as exc:  # store down: the lease runs out instead
            log.warning("could not requeue jobs of %s: %s", child.worker_id, exc.reason)
            return 0

    @staticmethod
    def _take_report(child: Child) -> str:
        """What a dead loop said about why its predictor could not start ("" when it said nothing)."""
        fd, child.report_fd = child.report_fd, None
        if fd is None:
            return ""
        try:
            return os.read(fd, 8192).decode(errors="replace").strip()
        except OSError:  # nothing written, and a process the predictor started holds the pipe open
            return ""
        finally:
            os.close(fd)

    def _failed_start(self, child: Child, how: str) -> None:
        """A loop died before it was ready; FAILED_STARTS in a row, and the API servers say why (503)."""
        assert child.stage is not None
        child.failed_starts += 1
        if child.failed_starts < FAILED_STARTS:
            return
        self._failing[child.stage] = (
            f"stage {child.stage} is not serving: its prediction loop failed to start {child.failed_starts} times "
            f"in a row (the last time: {how}); fastDeploy keeps restarting it"
        )
        self._failure_written = 0.0  # tell them on this tick

    def _write_failures(self) -> None:
        """Keep a record per failing stage in the store, where every API server reads why (``STARTUP_FAILURE``)."""
        assert self._store is not None
        self._failure_written = time.monotonic()
        for stage, reason in self._failing.items():
            info = WorkerInfo(self._failure_id(stage), stage, socket.gethostname(), os.getpid(), 0, False, time.time(),
                              {STARTUP_FAILURE: reason})
            try:
                self._store.heartbeat(info, self.settings.lease_seconds)
            except FastDeployError as exc:
                log.warning("could not record why stage %d is not serving: %s", stage, exc.reason)

    @staticmethod
    def _failure_id(stage: int) -> str:
        return f"{socket.gethostname()}-s{stage}-failing-{os.getpid()}"

    def _see_ready(self) -> None:
        """Learn from the store which loops are ready: a slot that was is restarted, never fatal; a stage
        serving again is no longer reported failing; once every stage is, say so."""
        assert self._store is not None
        try:
            workers = self._store.workers()
        except FastDeployError:  # not essential; try on the next tick
            return
        ready = {w.worker_id for w in workers if w.ready}
        for child in self.children:
            if child.role == "loop" and not child.ready and child.worker_id in ready:
                child.ready = child.ever_ready = True
                child.failed_starts = 0
                if child.stage in self._failing:
                    self._recovered(child.stage)
        if not self._announced_ready and all(
            any(c.ready and c.stage == stage for c in self.children) for stage in self.stages
        ):
            self._announced_ready = True
            sizes = {w.stage: w.batch_size for w in workers if w.ready}
            log.info("fastDeploy: %r ready in %.1f s (%s)", self.recipe.name, time.monotonic() - self._started,
                     ", ".join(f"stage {s}: batch size {b}" for s, b in sorted(sizes.items())))
            if self.serve_api:
                self._announce_urls()

    def _base_url(self) -> str:
        host = self.settings.host
        shown = "localhost" if host in ("", "0.0.0.0", "::") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def _announce_urls(self) -> None:
        """Where to go next: the API, its interactive page and the status page."""
        host = self.settings.host
        base = self._base_url()
        log.info("API:         %s  (POST /sync, /async; listening on %s)", base, host or "every address")
        log.info("API docs:    %s/docs", base)
        log.info("status page: %s/", base)

    def _recovered(self, stage: int) -> None:
        assert self._store is not None
        del self._failing[stage]
        log.info("stage %d is serving again", stage)
        try:
            self._store.release_worker(self._failure_id(stage))
        except FastDeployError as exc:  # the record expires by itself
            log.warning("could not clear the failure record of stage %d: %s", stage, exc.reason)

    # -- stop -----------------------------------------------------------------
    def _shutdown(self) -> None:
        log.info("fastDeploy: stopping")
        apis = [c for c in self.children if c.role == "api"]
        loops = [c for c in self.children if c.role == "loop"]
        self._stop_group(apis, self.settings.timeout + 10.0)
        self._stop_group(loops, LOOP_STOP_SECONDS)
        for child in loops:
            if child.report_fd is not None:
                os.close(child.report_fd)
                child.report_fd = None
        if self._store is not None:
            gone = [c.worker_id for c in loops if c.worker_id is not None]
            for worker_id in gone + [self._failure_id(stage) for stage in self._failing]:
                try:
                    self._store.release_worker(worker_id)
                except FastDeployError as exc:  # the store may be gone already
                    log.warning("could not release %s: %s", worker_id, exc.reason)

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


def _sweep_metrics_dirs() -> None:
    """Remove the metric folders of supervisors that are gone: one killed (SIGKILL) could not remove its own."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = folder.name[len(_METRICS_PREFIX):].split("-")[0]
        try:
            mine = folder.stat().st_uid == os.getuid()
            if pid.isdigit() and mine:
                os.kill(int(pid), 0)  # raises when no such process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # gone meanwhile, or a live process of another user
            continue


def _exit_description(code: int) -> str:
    """How a loop process ended, in words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"it was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"it exited with code {code}"
