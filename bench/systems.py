"""How each benchmarked system is installed, started, probed and stopped.

Every system is started in its own process group (setpgid).  Its processes
are that group plus all descendants of its root processes (a supervisor may
move workers into their own sessions): memory is summed over them.  Stopping:
ours gets SIGTERM on its supervisor (the `fastdeploy run` process) only, which
stops its children in order (API servers first, then the loops); the harness
waits for the supervisor to exit and only then SIGKILLs whatever is left.  The
peers get SIGTERM on all their processes at once, SIGKILL after a grace period.
The time each stop took is recorded (Server.stop() returns it).

  ours      this repo's server: `<current python> -m fastdeploy run RECIPE
            --host 127.0.0.1 --port PORT`; ready when GET /ready is 200;
            POST /sync {"data": [...]}
  fd311     the original fastDeploy 3.1.1 from PyPI in its own venv:
            `fastdeploy --recipe . --loop` and `fastdeploy --recipe . --rest`
            run inside a copy of the recipe folder; ready when GET /health is
            200 (the REST process only binds once the loop finished warm-up);
            POST /sync {"data": [...]}
  litserve  LitServe 0.2.19 from PyPI in its own venv, serving the recipe
            through bench/peers/litserve/server.py; ready when GET /health is
            200; POST /predict {"data": [...]}

A workload with a `path` (W1I: /infer, the fastDeploy 3.x protocol) is POSTed
there instead of the system's own endpoint (Server.url_for).
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import loadgen

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def http(method, url, body=None, content_type="application/json", timeout=5.0):
    """(status, body bytes); status 0 when the connection failed."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


def _clean_env(extra):
    env = dict(os.environ)
    # keep the peers' own interpreters isolated from the runner's environment
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PORT", "HOST", "WORKERS",
              "TIMEOUT", "BATCH_SIZE", "OPTIMAL_BATCH_SIZE", "MAX_WAIT"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Server:
    """A running system: its processes (one process group), URLs and logs."""

    def __init__(self, system, url, ready_url, run_dir):
        self.system = system
        self.url = url
        self.ready_url = ready_url
        self.run_dir = run_dir
        self.procs = []
        self.logs = []
        self.pgid = None
        self.known = {}  # pid -> start time (clock ticks), every process seen
        self.info = {}

    def spawn(self, name, cmd, cwd, env):
        log_path = os.path.join(self.run_dir, "%s.log" % name)
        log = open(log_path, "ab")
        # the first process leads a new process group, later ones join it (same
        # session, so setpgid is allowed); Ctrl+C on the runner does not reach them
        pg = 0 if self.pgid is None else self.pgid
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, process_group=pg)
        log.close()
        if self.pgid is None:
            self.pgid = p.pid
        self.procs.append(p)
        self.logs.append(log_path)
        return p

    @contextlib.contextmanager
    def cleanup_on_error(self):
        """Stop whatever was already started if a later step of start-up fails."""
        try:
            yield self
        except BaseException:
            self.stop()
            raise

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def wait_ready(self, timeout=120.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError("%s exited during start-up\n%s" % (self.system, self.log_tail()))
            status, _ = http("GET", self.ready_url, timeout=2.0)
            self._remember()
            if status == 200:
                return
            time.sleep(0.2)
        raise RuntimeError("%s not ready after %.0fs\n%s" % (self.system, timeout, self.log_tail()))

    def url_for(self, path):
        """This server's URL for `path` ("/infer?..."), in place of its own endpoint."""
        u = urlsplit(self.url)
        return "%s://%s%s" % (u.scheme, u.netloc, path)

    def probe(self, body, items, content_type="application/json", url=None, decode=None, expect=None):
        """One request (to `url`, default the system's endpoint): checks the answer is 200,
        success true, one output per input, and the prediction is `expect` when given.
        decode(bytes) -> document reads an answer that is not plain JSON."""
        status, resp = http("POST", url or self.url, body, content_type, timeout=30.0)
        if status != 200:
            raise RuntimeError("%s probe: HTTP %s %r" % (self.system, status, resp[:300]))
        try:
            data = (decode or json.loads)(resp)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad answer
            raise RuntimeError("%s probe: undecodable answer (%s) %r" % (self.system, e, resp[:300]))
        if data.get("success") is not True or len(data.get("prediction") or []) != items:
            raise RuntimeError("%s probe: unexpected answer %r" % (self.system, data if decode else resp[:300]))
        if expect is not None and data["prediction"] != expect:
            raise RuntimeError("%s probe: prediction %r, expected %r" % (self.system, data["prediction"], expect))
        return data

    def _roots(self):
        return [p.pid for p in self.procs]

    def _remember(self, table=None):
        """Add the server's current processes to self.known {pid: start_ticks}."""
        table = loadgen.proc_table() if table is None else table
        pids = loadgen.server_pids(self.pgid, self._roots(), table)
        self.known.update((p, table[p][4]) for p in pids)
        return table

    # how a process of this server is named in the per-role memory figures (None: no split)
    role_of = None
    # "all": SIGTERM every process at once; "root": SIGTERM the first process (a
    # supervisor) only, wait for it, then SIGKILL leftovers
    stop_mode = "all"
    # peers: SIGKILL 3 s after SIGTERM (LitServe's and 3.1.1's workers often ignore
    # SIGTERM; waiting longer only costs time)
    stop_grace = 3.0

    def rss_sampler(self):
        sampler = loadgen.RssSampler(self.pgid, self._roots(), role_of=self.role_of)
        sampler.seen = self.known  # shared: every process ever seen gets stopped
        return sampler

    def batch_stats(self):
        """Cumulative (predictor calls, items) so far, or None when the system does not say."""
        return None

    def stop(self, grace=None):
        """Stop the server; returns {"stop_s", "mode", "killed"}.

        mode "root": SIGTERM the root process only and wait up to `grace` s for it
        to exit (it stops its own children), then SIGKILL anything left.
        mode "all": SIGTERM every process, SIGKILL what is left after `grace` s."""
        if self.pgid is None:
            return None
        grace = self.stop_grace if grace is None else grace
        t0 = time.time()
        self._remember()
        root_exit_s = None
        if self.stop_mode == "root":
            root = self.procs[0]
            if root.poll() is None:
                try:
                    root.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    root.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if root.poll() is not None:
                root_exit_s = time.time() - t0
            # the supervisor is gone: its children are left only if it failed to stop them
            deadline = time.time() + 1.0
            while time.time() < deadline and self._live():
                time.sleep(0.05)
        else:
            self._signal_all(signal.SIGTERM)
            deadline = time.time() + grace
            while time.time() < deadline and self._live():
                time.sleep(0.1)
        graceful_s = time.time() - t0
        killed = self._live()
        if killed:
            self._signal_all(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and self._live():
            time.sleep(0.1)
        self.stop_info = {"mode": self.stop_mode, "stop_s": round(graceful_s, 2),
                          "root_exit_s": None if root_exit_s is None else round(root_exit_s, 2),
                          "killed": len(killed), "total_s": round(time.time() - t0, 2)}
        return self.stop_info

    def _live(self, table=None):
        """Known processes still running (same pid *and* start time: no reused pids)."""
        table = self._remember(table)
        return [pid for pid, start in self.known.items()
                if pid in table and table[pid][4] == start and table[pid][2] != "Z"]

    def _signal_all(self, sig):
        # the group, plus children a supervisor moved to their own session/group,
        # including ones already orphaned (reparented to init)
        live = self._live()
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def log_tail(self, n=30):
        out = []
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    f.seek(max(0, f.tell() - 20000))
                    lines = f.read().decode("utf-8", "replace").splitlines()[-n:]
                out.append("--- %s\n%s" % (path, "\n".join(lines)))
            except OSError:
                pass
        return "\n".join(out)


def copy_recipe(recipe_dir, run_dir):
    dst = os.path.join(run_dir, "recipe")
    shutil.copytree(recipe_dir, dst, ignore=shutil.ignore_patterns(
        "__pycache__", "fastdeploy_dbs", ".gitignore", ".dockerignore"))
    return dst


# --------------------------------------------------------------------------- #
# venvs for the peers
# --------------------------------------------------------------------------- #
def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def installed_version(venv, dist):
    try:
        # -I and cwd=/ so a checkout of this repo (fastdeploy.egg-info) is not seen
        out = subprocess.run([venv_python(venv), "-I", "-c",
                              "import importlib.metadata as m; print(m.version(%r))" % dist],
                             capture_output=True, text=True, timeout=60, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv(venv, dist, version, log=print):
    """Create `venv` and pip install dist==version into it unless already there."""
    if installed_version(venv, dist) == version:
        return
    if not os.path.exists(venv_python(venv)):
        log("creating venv %s" % venv)
        os.makedirs(os.path.dirname(venv), exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", venv], check=True)
    log("installing %s==%s into %s (one-off)" % (dist, version, venv))
    subprocess.run([venv_python(venv), "-I", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "%s==%s" % (dist, version)], check=True, cwd="/")
    if installed_version(venv, dist) != version:
        raise RuntimeError("could not install %s==%s into %s" % (dist, version, venv))


_VERSIONS_SCRIPT = """
import importlib.metadata as m, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def installed_versions(python, names):
    """{dist: version or None} in the environment of `python`."""
    r = subprocess.run([python, "-I", "-c", _VERSIONS_SCRIPT, json.dumps(sorted(names))],
                       capture_output=True, text=True, timeout=120, cwd="/")
    if r.returncode != 0:
        return {n: None for n in names}
    return json.loads(r.stdout)


def _pin_ok(installed, wanted):
    # "2.13.0+cpu" satisfies "2.13.0"
    return installed is not None and (installed == wanted or installed.split("+")[0] == wanted)


def missing_requirements(python, steps):
    """The pins of `steps` (see workloads.MODEL_REQUIREMENTS) not satisfied in `python`'s env."""
    pins = {}
    for step in steps:
        pins.update(step["pins"])
    have = installed_versions(python, pins)
    return {n: v for n, v in pins.items() if not _pin_ok(have.get(n), v)}


def ensure_requirements(python, steps, log=print):
    """pip install each step (in order: torch first, on its own) whose pins are missing."""
    for step in steps:
        missing = missing_requirements(python, [step])
        if not missing:
            continue
        log("installing %s into %s (one-off)" % (" ".join(step["args"]), os.path.dirname(os.path.dirname(python))))
        subprocess.run([python, "-I", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                       + list(step["args"]), check=True, cwd=REPO)
    missing = missing_requirements(python, steps)
    if missing:
        raise RuntimeError("could not install %s" % ", ".join("%s==%s" % kv for kv in sorted(missing.items())))


# --------------------------------------------------------------------------- #
# systems
# --------------------------------------------------------------------------- #
class System:
    key = ""
    label = ""

    def prepare(self, venv_root, log=print, requirements=()):
        """Install whatever is needed (plus the workloads' model `requirements`,
        see workloads.MODEL_REQUIREMENTS); raise RuntimeError when unavailable."""

    def version(self):
        return None

    def start(self, settings, port, run_dir):
        raise NotImplementedError


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def ours_role(pid):
    """api / loop / supervisor, from the command line `fastdeploy run` gives its children."""
    argv = _cmdline(pid)
    if b"_api" in argv or b"serve" in argv:
        return "api"
    if b"_loop" in argv or b"worker" in argv:
        return "loop"
    if b"run" in argv:
        return "supervisor"
    return "other"


class OursServer(Server):
    role_of = staticmethod(ours_role)
    stop_mode = "root"
    stop_grace = 60.0

    def batch_stats(self):
        """From GET /metrics: fastdeploy_batch_size_count / _sum (updated by the loops'
        heartbeats, i.e. up to ~1 s late)."""
        status, body = http("GET", self.url.rsplit("/", 1)[0] + "/metrics", timeout=5.0)
        if status != 200:
            return None
        calls = items = 0.0
        for line in body.decode("utf-8", "replace").splitlines():
            if line.startswith("fastdeploy_batch_size_count"):
                calls += float(line.rsplit(" ", 1)[1])
            elif line.startswith("fastdeploy_batch_size_sum"):
                items += float(line.rsplit(" ", 1)[1])
        return calls, items

    def batch_size(self):
        """The batch size the loop(s) chose, from GET /meta."""
        status, body = http("GET", self.url.rsplit("/", 1)[0] + "/meta", timeout=5.0)
        if status != 200:
            return None
        try:
            return json.loads(body)["stages"][0]["batch_size"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


class Ours(System):
    key, label = "ours", "fastDeploy (this repo)"

    def __init__(self, python=None):
        self.python = python or sys.executable

    def prepare(self, venv_root, log=print, requirements=()):
        r = subprocess.run([self.python, "-c", "import fastdeploy"], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("`import fastdeploy` fails in %s: %s" % (
                self.python, r.stderr.strip().splitlines()[-1:] or ""))
        # ours runs in the caller's environment: check, never install into it
        self.missing = missing_requirements(self.python, requirements) if requirements else {}
        if self.missing:
            log("ours: %s lacks %s: the model workloads will fail (install the recipes' "
                "requirements, torch==2.13.0 first)" % (self.python, ", ".join(sorted(self.missing))))

    def version(self):
        r = subprocess.run([self.python, "-c", "import fastdeploy; print(getattr(fastdeploy, '__version__', '?'))"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        return r.stdout.strip() or None

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        srv = OursServer(self.key, "http://127.0.0.1:%d/sync" % port,
                         "http://127.0.0.1:%d/ready" % port, run_dir)
        env = _clean_env(settings.get("env"))
        # run from the repo so an uninstalled checkout is importable too
        env["PYTHONPATH"] = REPO
        srv.spawn("server", [self.python, "-m", "fastdeploy", "run", recipe,
                             "--host", "127.0.0.1", "--port", str(port)] + list(settings.get("args", [])),
                  cwd=run_dir, env=env)
        return srv


class OursRawBatch(Ours):
    """Ours with BATCH_SIZE fixed to the raw predictor's best batch size of the run
    (workloads with a raw measurement only): separates the cost of ours' batch-size
    choice from its serving overhead."""
    key, label = "ours-rawbatch", "fastDeploy (this repo), BATCH_SIZE = raw best"


class _LogCounter:
    """Incrementally scans a log file for lines with a marker; keeps running totals."""

    def __init__(self, path, marker, parse):
        self.path, self.marker, self.parse = path, marker, parse
        self.offset, self.calls, self.items, self.last = 0, 0, 0, None

    def update(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return None
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in data[:end].splitlines():
            if self.marker in line:
                got = self.parse(line)
                if got is not None:
                    self.calls, self.items = got(self.calls, self.items)
        return self.calls, self.items


_FD311_BATCH_ITEM = re.compile(rb"': (\d+)")


def _fd311_batch(line):
    # 3.1.1 loop: "Fetched batch {'<uid>': <n inputs>, ...} with ... remaining"
    head = line.split(b"Fetched batch", 1)[1].split(b"} with", 1)[0]
    n = sum(int(x) for x in _FD311_BATCH_ITEM.findall(head))
    return lambda calls, items: (calls + 1, items + n)


class FD311Server(Server):
    def batch_stats(self):
        if not hasattr(self, "_counter"):
            self._counter = _LogCounter(self.logs[0], b"Fetched batch", _fd311_batch)
        return self._counter.update()


class LitServeServer(Server):
    def batch_stats(self):
        """From bench/peers/litserve/server.py's "FDBENCH_BATCHES pid=P calls=N items=M"
        lines (running totals per inference worker, printed after every batch when
        batching is on)."""
        if not hasattr(self, "_counter"):
            per_pid = {}

            def parse(line):
                try:
                    f = dict(kv.split(b"=") for kv in line.split(b"FDBENCH_BATCHES", 1)[1].split())
                    per_pid[f[b"pid"]] = (int(f[b"calls"]), int(f[b"items"]))
                except (ValueError, KeyError, IndexError):
                    return None
                calls = sum(c for c, _ in per_pid.values())
                items = sum(i for _, i in per_pid.values())
                return lambda _c, _i: (calls, items)

            self._counter = _LogCounter(self.logs[0], b"FDBENCH_BATCHES", parse)
        return self._counter.update()


class FastDeploy311(System):
    key, label = "fd311", "fastDeploy 3.1.1 (PyPI)"
    dist, ver = "fastdeploy", "3.1.1"

    def prepare(self, venv_root, log=print, requirements=()):
        self.venv = os.path.join(venv_root, "fd311")
        ensure_venv(self.venv, self.dist, self.ver, log)
        if requirements:
            ensure_requirements(venv_python(self.venv), requirements, log)

    def version(self):
        return self.ver

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        exe = os.path.join(self.venv, "bin", "fastdeploy")
        srv = FD311Server(self.key, "http://127.0.0.1:%d/sync" % port,
                          "http://127.0.0.1:%d/health" % port, run_dir)
        env = _clean_env(dict({"HOST": "127.0.0.1", "PORT": str(port)}, **settings.get("env", {})))
        # the loop warms up and picks the batch size; the REST process waits for it
        with srv.cleanup_on_error():
            srv.spawn("loop", [exe, "--recipe", ".", "--loop"], cwd=recipe, env=env)
            srv.spawn("rest", [exe, "--recipe", ".", "--rest"], cwd=recipe, env=env)
        return srv

    @staticmethod
    def chosen_batch_size(srv):
        """Parse 'Optimum batch size: N' from the loop log."""
        try:
            with open(srv.logs[0], "rb") as f:
                for line in f:
                    if b"Optimum batch size:" in line:
                        return int(line.split(b"Optimum batch size:")[1].split(b",")[0])
        except (OSError, ValueError):
            pass
        return None


class LitServe(System):
    key, label = "litserve", "LitServe 0.2.19 (PyPI)"
    dist, ver = "litserve", "0.2.19"

    def prepare(self, venv_root, log=print, requirements=()):
        self.venv = os.path.join(venv_root, "litserve")
        ensure_venv(self.venv, self.dist, self.ver, log)
        if requirements:
            ensure_requirements(venv_python(self.venv), requirements, log)

    def version(self):
        return self.ver

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        srv = LitServeServer(self.key, "http://127.0.0.1:%d/predict" % port,
                             "http://127.0.0.1:%d/health" % port, run_dir)
        script = os.path.join(BENCH, "peers", "litserve", "server.py")
        srv.spawn("server", [venv_python(self.venv), script, "--recipe", recipe,
                             "--host", "127.0.0.1", "--port", str(port)] + list(settings.get("args", [])),
                  cwd=run_dir, env=_clean_env(settings.get("env")))
        return srv


SYSTEMS = {s.key: s for s in (Ours(), OursRawBatch(), FastDeploy311(), LitServe())}
