"""Benchmark workloads.

A workload is: which recipe each system serves (plus per-system settings),
a request-body factory, how many items one request carries, and the client
counts to run.  To add one (e.g. W3 text embeddings, W4 base64 WAV files):
write bench/recipes/<name>/ (predictor.py + example.py), a fastDeploy 3.1.1
recipe under bench/peers/fastdeploy311/<name>/ (usually the same two files),
and append a Workload to WORKLOADS.  The LitServe peer serves any recipe
folder through bench/peers/litserve/server.py, so it only needs CLI settings.

Per-system settings (Workload.systems[<system>], a dict or a function of the
run context {"raw": the raw-predictor row of this run or None, "cores": N}):
  recipe  folder with predictor.py + example.py (copied to a scratch run
          folder before start, because fastDeploy 3.1.1 writes into it)
  env     extra environment variables for the server processes
  args    extra command-line arguments (LitServe server script)
  note    free text shown in results.json
Workload.skip[<system>] = reason: the system is not run on this workload and the
table shows the reason instead.  Workload.path (e.g. "/infer?..."), when set,
replaces every system's own endpoint (/sync, /predict) for the probe and the
load; Workload.decode_answer (bytes -> answer document) and .expect (the
prediction) are what the probe checks when the answer is not plain JSON.

The model workloads (W3 MiniLM, W4 VAD) serve the recipes in recipes/ with
every system (same predictor.py, same example.py), need the recipes'
requirements in every environment (MODEL_REQUIREMENTS: the peers' venvs get
them installed on first use, torch==2.13.0 first and on its own) and measure
the raw predictor in the same run (Workload.raw, see measure_raw()).
"""
import base64
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import msgpack  # W1I: the fastDeploy 3.x protocol (both are dependencies of fastdeploy)
import zstandard

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RECIPES = os.path.join(BENCH, "recipes")
FD311_RECIPES = os.path.join(BENCH, "peers", "fastdeploy311")
MODEL_RECIPES = os.path.join(REPO, "recipes")  # the real-model recipes (minilm, vad)


def _pins(path):
    """{dist: version} from the name==version lines of a requirements file."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                out[name.strip().lower()] = ver.strip()
    return out


_MINILM_REQ = os.path.join(MODEL_RECIPES, "minilm", "requirements.txt")
_VAD_REQ = os.path.join(MODEL_RECIPES, "vad", "requirements.txt")
_VAD_NODEPS = os.path.join(MODEL_RECIPES, "vad", "requirements-nodeps.txt")

# pip install steps for the model workloads, in this order: torch==2.13.0 FIRST and on
# its own (a local CPU wheel here; an unpinned torch would pull a multi-GB CUDA build),
# then the recipes' requirements, then silero-vad WITHOUT its dependencies (it declares
# torch, which the VAD recipe never imports).  Each step runs only when its pins are
# missing.  "pins" are what is checked afterwards (torch "2.13.0+cpu" counts as 2.13.0).
MODEL_REQUIREMENTS = [
    {"pins": {"torch": "2.13.0"}, "args": ["torch==2.13.0"]},
    {"pins": dict(_pins(_MINILM_REQ), **_pins(_VAD_REQ)), "args": ["-r", _MINILM_REQ, "-r", _VAD_REQ]},
    {"pins": _pins(_VAD_NODEPS), "args": ["--no-deps", "-r", _VAD_NODEPS]},
]


@dataclass
class Workload:
    key: str
    name: str
    description: str
    make_body: Callable[[], bytes]
    items_per_request: int
    clients: List[int]
    clients_quick: List[int]
    systems: Dict[str, dict]
    content_type: str = "application/json"
    # optional: extra reference rows, extras(quick) -> list of dicts
    extras: Optional[Callable[[bool], List[dict]]] = None
    notes: List[str] = field(default_factory=list)
    # systems not run on this workload: {system: reason shown in the table}
    skip: Dict[str, str] = field(default_factory=dict)
    # raw predictor measured in the same run (see measure_raw): {"recipe", "inputs",
    # "batch_sizes", "batch_sizes_quick"}
    raw: Optional[dict] = None
    # pip install steps every environment needs (see MODEL_REQUIREMENTS)
    requirements: List[dict] = field(default_factory=list)
    # path and query POSTed to on every system instead of its own endpoint (/sync, /predict)
    path: Optional[str] = None
    # how the probe reads an answer (bytes -> {"success", "prediction", ...}); JSON when None
    decode_answer: Optional[Callable[[bytes], dict]] = None
    # the prediction the probe must get back (checked when not None)
    expect: Optional[Any] = None

    def body(self):
        if not hasattr(self, "_body"):  # built once: W4's is a base64 WAV file
            body = self.make_body()
            self._body = body.encode() if isinstance(body, str) else body
        return self._body

    def clients_for(self, quick):
        return self.clients_quick if quick else self.clients

    def settings_for(self, system, ctx=None):
        spec = self.systems[system]
        return spec(ctx or {}) if callable(spec) else spec


def json_body(items):
    return lambda: json.dumps({"data": items}).encode()


def _load_predictor(recipe_dir):
    spec = importlib.util.spec_from_file_location(
        "bench_recipe_%s" % os.path.basename(recipe_dir), os.path.join(recipe_dir, "predictor.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.predictor


# --------------------------------------------------------------------------- #
# W1 echo
# --------------------------------------------------------------------------- #
W1 = Workload(
    key="w1",
    name="echo",
    description="predictor returns its inputs; one small JSON item per request (pure serving overhead)",
    make_body=json_body([{"text": "hello", "id": 1}]),
    items_per_request=1,
    clients=[1, 16, 64],
    clients_quick=[1, 16, 64],
    systems={
        "ours": {"recipe": os.path.join(RECIPES, "echo"), "env": {}},
        "fd311": {
            "recipe": os.path.join(FD311_RECIPES, "echo"),
            # 3.1.1's default OPTIMAL_BATCH_SIZE=0 times the echo predictor at
            # 1, 2, 4, ... and keeps the size after which time/item stops falling:
            # with a ~free predictor that is timer noise (8, 32 or 64 from run to
            # run; 8 gives ~1,400 req/s at 64 clients, 64 gives ~2,400), so the
            # best size measured here is pinned.  3 gunicorn+gevent REST workers.
            "env": {"OPTIMAL_BATCH_SIZE": "64"},
            "note": "OPTIMAL_BATCH_SIZE=64 (best of 8/32/64/128 measured; the default auto search "
                    "picks 8-64 at random for a ~free predictor), WORKERS=3 default",
        },
        "litserve": {
            "recipe": os.path.join(RECIPES, "echo"),
            # chosen after trying the alternatives, see bench/peers/litserve/README.md
            "args": ["--max-batch-size", "1", "--workers-per-device", "2", "--num-api-servers", "2"],
            "note": "best W1 setting found on 2 cores: no batching (SingleLoop), 2 inference workers, "
                    "2 uvicorn API servers",
        },
    },
)


# --------------------------------------------------------------------------- #
# W1I echo over the fastDeploy 3.x protocol: what fdclient 3.1.2 sends
# --------------------------------------------------------------------------- #
# FDClient(url, request_timeout=10).infer(["hello"]) against a server whose /meta says
# pickle is off (both here): msgpack.packb(data, use_bin_type=True), compressed by
# zstandard.ZstdCompressor(level=-1) (16 bytes), Content-Type application/octet-stream,
# POST /infer?unique_id=<uuid4>&async=False&input_type=msgpack&compressed=True&timeout=10
# (requests' encoding of its params, in that order).  The load generator sends one fixed
# request, so unique_id is left out: both servers then make a fresh id per request (3.1.1:
# uuid4, ours: its own), so every request still has an id of its own, as with fdclient;
# one id repeated would be refused (ours: 409) or mix answers up (3.1.1 keys waiting
# requests by it).
W1I_INPUTS = ["hello"]
W1I_PATH = "/infer?async=False&input_type=msgpack&compressed=True&timeout=10"


def _w1i_body():
    return zstandard.ZstdCompressor(level=-1).compress(msgpack.packb(W1I_INPUTS, use_bin_type=True))


def _w1i_answer(data):
    """The 3.x answer as fdclient reads it: zstd, then msgpack; the server must have made an id."""
    document = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data), raw=False)
    if not isinstance(document, dict):
        raise ValueError("not a map: %r" % (document,))
    if document.get("success") is True and not (isinstance(document.get("unique_id"), str)
                                                and document["unique_id"]):
        raise ValueError("no unique_id in the answer: %r" % (document,))
    return document


W1I = Workload(
    key="w1i",
    name="echo-3x",
    description="W1 echo over the fastDeploy 3.x protocol: fdclient 3.1.2's body for infer([\"hello\"]) "
                "(msgpack, zstd) on POST %s, Content-Type application/octet-stream" % W1I_PATH,
    make_body=_w1i_body,
    items_per_request=1,
    clients=[1, 16, 64],
    clients_quick=[1, 16, 64],
    content_type="application/octet-stream",
    path=W1I_PATH,
    decode_answer=_w1i_answer,
    expect=W1I_INPUTS,
    # the same recipes and settings as W1 (3.1.1 serves /infer natively)
    systems={"ours": W1.systems["ours"], "fd311": W1.systems["fd311"]},
    skip={"litserve": "LitServe has no /infer (no fastDeploy 3.x protocol): it serves /predict only"},
)


# --------------------------------------------------------------------------- #
# W2 batch cost
# --------------------------------------------------------------------------- #
W2_BATCH = 32
W2_LIMIT = W2_BATCH / (0.010 + 0.001 * W2_BATCH)  # 762 items/s


def _w2_extras(quick):
    """The raw predictor in a plain loop at batch 32, and the physical limit."""
    predictor = _load_predictor(os.path.join(RECIPES, "batch_cost"))
    batch = [{"text": "hello", "id": i} for i in range(W2_BATCH)]
    duration = 2.0 if quick else 5.0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        predictor(batch, batch_size=W2_BATCH)
        n += 1
    dt = time.perf_counter() - t0
    return [
        {"system": "raw-predictor", "workload": "w2", "clients": None,
         "items_per_s": n * W2_BATCH / dt, "rps": n / dt,
         "p50_ms": dt / n * 1000, "note": "predictor(batch of 32) called in a plain loop; "
                                          "rps = calls/s, p50 = ms per call"},
        {"system": "physical-limit", "workload": "w2", "clients": None,
         "items_per_s": W2_LIMIT, "note": "32 / (0.010 + 0.001 * 32) = 762 items/s"},
    ]


W2 = Workload(
    key="w2",
    name="batch_cost",
    description="predictor sleeps 10 ms + 1 ms per item; batch size fixed to 32; one item per request",
    make_body=json_body([{"text": "hello", "id": 1}]),
    items_per_request=1,
    clients=[64, 256],
    clients_quick=[64, 256],
    systems={
        "ours": {"recipe": os.path.join(RECIPES, "batch_cost"), "env": {"BATCH_SIZE": str(W2_BATCH)}},
        "fd311": {
            "recipe": os.path.join(FD311_RECIPES, "batch_cost"),
            # 3.1.1 has no BATCH_SIZE variable: OPTIMAL_BATCH_SIZE skips the search
            "env": {"OPTIMAL_BATCH_SIZE": str(W2_BATCH)},
            "note": "OPTIMAL_BATCH_SIZE=32 (the search then only tries 32); WORKERS=3 default",
        },
        "litserve": {
            "recipe": os.path.join(RECIPES, "batch_cost"),
            "args": ["--max-batch-size", str(W2_BATCH), "--batch-timeout", "0.005",
                     "--workers-per-device", "1", "--num-api-servers", "1"],
            "note": "max_batch_size=32, batch_timeout=5 ms, one inference worker (one predictor, "
                    "like the others), 1 API server",
        },
    },
    extras=_w2_extras,
)


# --------------------------------------------------------------------------- #
# the raw predictor of a model workload, measured in the same run
# --------------------------------------------------------------------------- #
RAW_ROUNDS = 2  # the sweep runs twice and each size keeps its best: one disturbance does not lower the target


def measure_raw(wl, quick, python=None, log=print, cores=None, processes=1):
    """Time the recipe's predictor in a plain loop, in fresh processes of `python`
    (the interpreter ours runs with, which has the recipes' requirements), on
    batches made of the very item(s) the workload's requests carry, at each batch
    size of the sweep.

    processes=1 (the issue's baseline, row `raw-predictor`): one process with
    cores threads (OMP_NUM_THREADS and torch threads = the machine's cores).
    processes=N (row `raw-parallel`): N processes started together, each with
    cores / N threads, running the same sweep side by side; items/s are summed
    per batch size.  This is the most a layout of N prediction loops can serve.
    Returns the row (best batch size and its items/s, plus the whole sweep)."""
    spec = wl.raw
    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // processes)
    sizes = spec["batch_sizes_quick" if quick else "batch_sizes"]
    seconds = (0.5 if quick else 1.5) * (2 if processes > 1 else 1)  # longer: the runs start a little apart
    with tempfile.TemporaryDirectory(prefix="fdbench-raw-") as tmp:
        inputs = os.path.join(tmp, "inputs.json")
        with open(inputs, "w") as f:
            json.dump(spec["inputs"], f)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
            env.pop(k, None)
        t0 = time.time()
        procs = []
        for i in range(processes):
            out = os.path.join(tmp, "raw%d.json" % i)
            cmd = [python or sys.executable, os.path.join(BENCH, "raw_models.py"), "--recipes", spec["recipe"],
                   "--inputs", inputs, "--threads", str(threads), "--batch-sizes", ",".join(map(str, sizes)),
                   "--seconds", str(seconds), "--rounds", str(RAW_ROUNDS), "--json", out]
            procs.append((out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
        reports = []
        for out, proc in procs:
            text, _ = proc.communicate(timeout=600)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError("raw predictor of %s failed:\n%s" % (wl.key, (text or "")[-2000:]))
            with open(out) as f:
                reports.append(json.load(f)["recipes"][0]["results"])
    results = []
    for per_size in zip(*reports):  # the same sweep in every process
        results.append({"batch_size": per_size[0]["batch_size"],
                        "items_per_s": sum(x["items_per_s"] for x in per_size),
                        "ms_per_batch": sum(x["ms_per_batch"] for x in per_size) / len(per_size)})
    best = max(results, key=lambda x: x["items_per_s"])
    what = ("%d threads" % threads if processes == 1
            else "%d processes x %d thread%s" % (processes, threads, "" if threads == 1 else "s"))
    log("%s raw predictor (%s, %.0fs): %s -> best batch %d: %.1f items/s" % (
        wl.key, what, time.time() - t0,
        " ".join("%d:%.0f" % (x["batch_size"], x["items_per_s"]) for x in results),
        best["batch_size"], best["items_per_s"]))
    return {
        "system": "raw-predictor" if processes == 1 else "raw-parallel", "workload": wl.key, "clients": None,
        "items_per_s": best["items_per_s"], "rps": processes * 1000.0 / best["ms_per_batch"],
        "p50_ms": best["ms_per_batch"], "batch_size": best["batch_size"], "threads": threads,
        "processes": processes,
        "sweep": results,
        "note": "predictor(batch) in a plain loop, %s, best of batch sizes %s; "
                "rps = calls/s, p50 = ms per call" % (what, sizes),
    }


# --------------------------------------------------------------------------- #
# W3 sentence embeddings (MiniLM), JSON
# --------------------------------------------------------------------------- #
W3_SENTENCE = "Batching several requests together makes inference faster on CPU."
LITSERVE_BATCH_TIMEOUT = 0.005  # s; as in W2


def _cores(ctx):
    return ctx.get("cores") or os.cpu_count() or 1


def _litserve_model_settings(ctx):
    raw = ctx.get("raw") or {}
    size = raw.get("batch_size") or 64  # 64 when the raw measurement failed
    return {
        "args": ["--max-batch-size", str(size), "--batch-timeout", str(LITSERVE_BATCH_TIMEOUT),
                 "--workers-per-device", str(_cores(ctx)), "--num-api-servers", "1"],
        "env": {"OMP_NUM_THREADS": "1"},
        "batch_size": size,
        "note": "max_batch_size = the raw predictor's best batch size in this run (%s), batch_timeout "
                "%g ms, one inference worker per core with OMP_NUM_THREADS=1 (the layout ours runs "
                "here), one API server"
                % (size if raw else "64: raw measurement missing", LITSERVE_BATCH_TIMEOUT * 1000),
    }


def _ours_model_settings(recipe):
    def settings(ctx):
        return {
            "recipe": recipe,
            "env": {"FASTDEPLOY_REPLICAS": str(_cores(ctx))},
            "note": "one prediction loop per core (--replicas %d), so threads = cores / loops = 1 "
                    "(ours' default); batch size measured by ours at start-up" % _cores(ctx),
        }
    return settings


def _fd311_model_settings(recipe):
    def settings(ctx):
        return {
            "recipe": recipe,
            # no OPTIMAL_BATCH_SIZE: 3.1.1 searches the batch size at start-up, as its users get
            "env": {"OMP_NUM_THREADS": str(ctx.get("cores") or os.cpu_count() or 1)},
            "note": "batch size searched by 3.1.1 at start-up (OPTIMAL_BATCH_SIZE unset); WORKERS=3 "
                    "default; OMP_NUM_THREADS = cores",
        }
    return settings


def _ours_rawbatch_settings(recipe):
    def settings(ctx):
        raw = ctx.get("raw") or {}
        if not raw.get("batch_size"):
            raise RuntimeError("no raw predictor measurement in this run: no batch size to fix")
        return {
            "recipe": recipe,
            "env": {"BATCH_SIZE": str(raw["batch_size"]), "FASTDEPLOY_REPLICAS": str(_cores(ctx))},
            "note": "ours with BATCH_SIZE = the raw predictor's best batch size in this run (%d) instead "
                    "of its own measurement; one loop per core as `ours`" % raw["batch_size"],
        }
    return settings


def _with_recipe(recipe, fn):
    def settings(ctx):
        out = fn(ctx)
        out["recipe"] = recipe
        return out
    return settings


def _model_systems(recipe, fd311):
    """The systems serving a real-model recipe (fd311 only where it can take the requests)."""
    systems = {
        "ours": _ours_model_settings(recipe),
        "ours-rawbatch": _ours_rawbatch_settings(recipe),
        "litserve": _with_recipe(recipe, _litserve_model_settings),
    }
    if fd311:
        systems["fd311"] = _fd311_model_settings(recipe)
    return systems


W3 = Workload(
    key="w3",
    name="minilm",
    description="sentence embeddings with all-MiniLM-L6-v2 (torch, CPU); one sentence per JSON request",
    make_body=json_body([W3_SENTENCE]),
    items_per_request=1,
    clients=[16, 64],
    clients_quick=[16, 64],
    systems=_model_systems(os.path.join(MODEL_RECIPES, "minilm"), fd311=True),
    raw={"recipe": os.path.join(MODEL_RECIPES, "minilm"), "inputs": [W3_SENTENCE],
         "batch_sizes": [1, 8, 16, 32, 64, 128, 256], "batch_sizes_quick": [16, 32, 64, 128]},
    requirements=MODEL_REQUIREMENTS,
)


# --------------------------------------------------------------------------- #
# W4 voice activity detection (silero-vad, ONNX), FILE: one base64 WAV per request
# --------------------------------------------------------------------------- #
W4_FILE = os.path.join(MODEL_RECIPES, "vad", "examples", "speech_weather.wav")  # 2.76 s, 88 KB


def _w4_body():
    with open(W4_FILE, "rb") as f:
        encoded = base64.b64encode(f.read()).decode()
    return json.dumps({"data": {os.path.basename(W4_FILE): encoded}}).encode()


W4 = Workload(
    key="w4",
    name="vad",
    description="voice activity detection with silero-vad (ONNX Runtime); one 2.76 s 16 kHz WAV per "
                'request as a base64 FILE input {"data": {"speech_weather.wav": "<base64>"}}',
    make_body=_w4_body,
    items_per_request=1,
    clients=[16, 64],
    clients_quick=[16, 64],
    systems=_model_systems(os.path.join(MODEL_RECIPES, "vad"), fd311=False),
    skip={"fd311": "3.1.1 has no FILE inputs: /sync takes a JSON/msgpack/pickle list and answers 400 "
                   "'inputs have to be a list or tuple' to {\"data\": {\"name.wav\": \"<base64>\"}}; "
                   "its loop only ever passes the decoded list to the predictor"},
    raw={"recipe": os.path.join(MODEL_RECIPES, "vad"), "inputs": [W4_FILE],
         "batch_sizes": [1, 8, 16, 32, 64, 128, 256], "batch_sizes_quick": [16, 32, 64, 128]},
    requirements=MODEL_REQUIREMENTS,
)


W4M_BOUNDARY = "fdbench4m"


def _w4m_body():
    """What ``curl -F speech_weather.wav=@speech_weather.wav`` sends: the WAV as one multipart file part."""
    with open(W4_FILE, "rb") as f:
        wav = f.read()
    name = os.path.basename(W4_FILE)
    head = ('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\nContent-Type: audio/wav\r\n\r\n'
            % (W4M_BOUNDARY, name, name)).encode()
    return head + wav + ("\r\n--%s--\r\n" % W4M_BOUNDARY).encode()


W4M = Workload(
    key="w4m",
    name="vad-multipart",
    description="W4 with the WAV sent as multipart/form-data (curl -F), streamed to disk by the API server "
                "and handed to the predictor where it lies (88 KB body instead of 118 KB of base64)",
    make_body=_w4m_body,
    items_per_request=1,
    clients=[16, 64],
    clients_quick=[16, 64],
    content_type="multipart/form-data; boundary=" + W4M_BOUNDARY,
    systems={"ours": W4.systems["ours"]},
    skip={"fd311": "3.1.1 has no FILE inputs", "litserve": "the LitServe server of this benchmark takes the "
          "base64 JSON body of W4 (LitServe's multipart needs a different decode_request)"},
    raw=W4.raw,
    requirements=MODEL_REQUIREMENTS,
)


WORKLOADS = {w.key: w for w in (W1, W1I, W2, W3, W4, W4M)}
