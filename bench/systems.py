"""How each benchmarked system is installed, started, probed and stopped.

Every system is started in its own process group (setpgid).  Its processes
are that group plus all descendants of its root processes (a supervisor may
move workers into their own sessions): memory is summed over them, and
stopping sends SIGTERM to all of them, then SIGKILL after a grace period.

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
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

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

    def probe(self, body, items, content_type="application/json"):
        """One request: checks the answer is 200, success true, one output per input."""
        status, resp = http("POST", self.url, body, content_type, timeout=30.0)
        if status != 200:
            raise RuntimeError("%s probe: HTTP %s %r" % (self.system, status, resp[:300]))
        data = json.loads(resp)
        if data.get("success") is not True or len(data.get("prediction") or []) != items:
            raise RuntimeError("%s probe: unexpected answer %r" % (self.system, resp[:300]))
        return data

    def _roots(self):
        return [p.pid for p in self.procs]

    def _remember(self, table=None):
        """Add the server's current processes to self.known {pid: start_ticks}."""
        table = loadgen.proc_table() if table is None else table
        pids = loadgen.server_pids(self.pgid, self._roots(), table)
        self.known.update((p, table[p][4]) for p in pids)
        return table

    def rss_sampler(self):
        sampler = loadgen.RssSampler(self.pgid, self._roots())
        sampler.seen = self.known  # shared: every process ever seen gets stopped
        return sampler

    def stop(self, grace=8.0):
        """SIGTERM every process of the server, SIGKILL what is left after `grace` s."""
        if self.pgid is None:
            return
        self._signal_all(signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and self._live():
            time.sleep(0.1)
        if self._live():
            self._signal_all(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and self._live():
            time.sleep(0.1)

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


# --------------------------------------------------------------------------- #
# systems
# --------------------------------------------------------------------------- #
class System:
    key = ""
    label = ""

    def prepare(self, venv_root, log=print):
        """Install whatever is needed; raise RuntimeError when unavailable."""

    def version(self):
        return None

    def start(self, settings, port, run_dir):
        raise NotImplementedError


class Ours(System):
    key, label = "ours", "fastDeploy (this repo)"

    def __init__(self, python=None):
        self.python = python or sys.executable

    def prepare(self, venv_root, log=print):
        r = subprocess.run([self.python, "-c", "import fastdeploy"], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("`import fastdeploy` fails in %s: %s" % (
                self.python, r.stderr.strip().splitlines()[-1:] or ""))

    def version(self):
        r = subprocess.run([self.python, "-c", "import fastdeploy; print(getattr(fastdeploy, '__version__', '?'))"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        return r.stdout.strip() or None

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        srv = Server(self.key, "http://127.0.0.1:%d/sync" % port,
                     "http://127.0.0.1:%d/ready" % port, run_dir)
        env = _clean_env(settings.get("env"))
        # run from the repo so an uninstalled checkout is importable too
        env["PYTHONPATH"] = REPO
        srv.spawn("server", [self.python, "-m", "fastdeploy", "run", recipe,
                             "--host", "127.0.0.1", "--port", str(port)] + list(settings.get("args", [])),
                  cwd=run_dir, env=env)
        return srv


class FastDeploy311(System):
    key, label = "fd311", "fastDeploy 3.1.1 (PyPI)"
    dist, ver = "fastdeploy", "3.1.1"

    def prepare(self, venv_root, log=print):
        self.venv = os.path.join(venv_root, "fd311")
        ensure_venv(self.venv, self.dist, self.ver, log)

    def version(self):
        return self.ver

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        exe = os.path.join(self.venv, "bin", "fastdeploy")
        srv = Server(self.key, "http://127.0.0.1:%d/sync" % port,
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

    def prepare(self, venv_root, log=print):
        self.venv = os.path.join(venv_root, "litserve")
        ensure_venv(self.venv, self.dist, self.ver, log)

    def version(self):
        return self.ver

    def start(self, settings, port, run_dir):
        recipe = copy_recipe(settings["recipe"], run_dir)
        srv = Server(self.key, "http://127.0.0.1:%d/predict" % port,
                     "http://127.0.0.1:%d/health" % port, run_dir)
        script = os.path.join(BENCH, "peers", "litserve", "server.py")
        srv.spawn("server", [venv_python(self.venv), script, "--recipe", recipe,
                             "--host", "127.0.0.1", "--port", str(port)] + list(settings.get("args", [])),
                  cwd=run_dir, env=_clean_env(settings.get("env")))
        return srv


SYSTEMS = {s.key: s for s in (Ours(), FastDeploy311(), LitServe())}
