"""LitServe (0.2.19) peer for the fastDeploy benchmark.

Serves any fastDeploy-style recipe folder (predictor.py with
``predictor(inputs, batch_size=1)`` + example.py with ``example = [...]``)
through a ``litserve.LitAPI``, so LitServe runs exactly the same predictor
code as the other systems.

Request body:  {"data": [x1, x2, ...]}   (POST, JSON)
Response body: {"success": true, "prediction": [y1, y2, ...]}  (one y per x)

Run it with the python of the LitServe venv, e.g.:

    /work/venvs/litserve/bin/python bench/peers/litserve/server.py \
        --recipe bench/recipes/batch_cost --port 8000 \
        --max-batch-size 32 --batch-timeout 0.005

How the LitAPI hooks are used (per request / per batch):
  decode_request(request) -> request["data"]  (the list of items of one request)
  batch(inputs)           -> LitAPI default: the list of per-request lists
  predict(x)              -> flattens the per-request lists into one list of
                             items, calls predictor() once, splits the outputs
                             back per request
  unbatch(output)         -> LitAPI default: list(output), one entry per request
  encode_response(output) -> {"success": True, "prediction": output}
LitServe batches *requests*, not items: with max_batch_size=32 and one item
per request (the benchmark's case) a batch is at most 32 items.

FILE recipes (example.py says ``input_type = "file"``) take the body fastDeploy
takes for them, ``{"data": {"name.wav": "<base64>", ...}}``: decode_request
(which LitServe runs in the inference worker) base64-decodes each file into a
private temporary folder under its base name, predict() calls the predictor
with the paths (all files of the batch in one call) and deletes the folders
before the answers go out; the prediction is an object keyed by the request's
file names, as fastDeploy answers.

When batching (max_batch_size > 1) every predictor call prints a running total
``FDBENCH_BATCHES pid=P calls=N items=M`` to stdout, from which the benchmark
computes the mean batch size.
"""
import argparse
import base64
import binascii
import importlib.util
import os
import shutil
import sys
import tempfile

import litserve as ls
from fastapi import HTTPException


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Files:
    """One FILE request after decoding: its temp folder, file names (keys) and paths."""

    def __init__(self, folder, keys, paths):
        self.folder, self.keys, self.paths = folder, keys, paths

    def __len__(self):
        return len(self.paths)


def _base_name(key):
    base = str(key).replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or "\x00" in base:
        raise HTTPException(400, "file name %r has no usable base name" % (key,))
    return base


class RecipeAPI(ls.LitAPI):
    """Wraps a recipe's predictor() in LitServe's hook pipeline."""

    def __init__(self, recipe_dir, **kwargs):
        super().__init__(**kwargs)
        self.recipe_dir = os.path.abspath(recipe_dir)
        example = _load_module(os.path.join(self.recipe_dir, "example.py"), "recipe_example_probe")
        self.file_mode = getattr(example, "input_type", "json") == "file"
        self._calls = self._items = 0

    def setup(self, device):
        # runs once in every inference worker process
        sys.path.insert(0, self.recipe_dir)
        os.chdir(self.recipe_dir)  # as fastDeploy's loops do: example paths are relative to it
        self._predictor = _load_module(
            os.path.join(self.recipe_dir, "predictor.py"), "recipe_predictor"
        ).predictor
        module = _load_module(os.path.join(self.recipe_dir, "example.py"), "recipe_example")
        example = list(module.example)
        if self.file_mode:
            example = [os.path.join(self.recipe_dir, p) for p in example]
        for _ in range(3):  # warm-up, as fastDeploy does
            self._predictor(list(example))

    # NOTE: LitServe looks the parameter up by the name "request"; with no type
    # annotation it passes the parsed JSON body (request.json()).
    def decode_request(self, request):
        try:
            data = request["data"]
        except (KeyError, TypeError):
            raise HTTPException(400, 'body must be {"data": ...}')
        if self.file_mode:
            return self._decode_files(data)
        if not isinstance(data, list):
            raise HTTPException(400, '"data" must be a list')
        return data

    @staticmethod
    def _decode_files(data):
        if not isinstance(data, dict):
            raise HTTPException(400, 'this recipe takes files: {"data": {"name.ext": "<base64>"}}')
        folder = tempfile.mkdtemp(prefix="litserve-")
        keys, paths, seen = [], [], set()
        try:
            for key, encoded in data.items():
                base = _base_name(key)
                if base in seen:
                    raise HTTPException(400, "two files named %r" % base)
                seen.add(base)
                if not isinstance(encoded, str):
                    raise HTTPException(400, "file %r: the value must be a base64 string" % key)
                try:
                    raw = base64.b64decode(encoded, validate=True)
                except (binascii.Error, ValueError):
                    raise HTTPException(400, "file %r is not valid base64" % key)
                path = os.path.join(folder, base)
                with open(path, "wb") as f:
                    f.write(raw)
                keys.append(key)
                paths.append(path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return _Files(folder, keys, paths)

    def predict(self, x):
        # SingleLoop (max_batch_size 1): x is one request; BatchedLoop: a list of requests
        requests = [x] if self.max_batch_size == 1 else list(x)
        try:
            flat = [item for r in requests for item in (r.paths if self.file_mode else r)]
            outputs = list(self._predictor(flat, batch_size=max(1, self.max_batch_size)))
            if len(outputs) != len(flat):
                raise HTTPException(500, "predictor returned a wrong number of outputs")
            if self.max_batch_size > 1:
                self._calls += 1
                self._items += len(flat)
                print("FDBENCH_BATCHES pid=%d calls=%d items=%d" % (os.getpid(), self._calls, self._items),
                      flush=True)
            per_request, start = [], 0
            for r in requests:
                out = outputs[start: start + len(r)]
                start += len(r)
                per_request.append(dict(zip(r.keys, out)) if self.file_mode else out)
        finally:
            if self.file_mode:  # files never outlive their request
                for r in requests:
                    shutil.rmtree(r.folder, ignore_errors=True)
        return per_request[0] if self.max_batch_size == 1 else per_request

    def encode_response(self, output):
        return {"success": True, "prediction": output if isinstance(output, dict) else list(output)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="folder with predictor.py + example.py")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-path", default="/predict")
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--batch-timeout", type=float, default=0.0,
                   help="seconds to wait for a batch to fill (only used when max-batch-size > 1)")
    p.add_argument("--workers-per-device", type=int, default=1,
                   help="inference worker processes (accelerator=cpu means one device)")
    p.add_argument("--num-api-servers", type=int, default=None,
                   help="uvicorn API server processes (LitServe default: = number of inference workers)")
    p.add_argument("--fast-queue", action="store_true", help="use LitServe's ZeroMQ transport")
    p.add_argument("--timeout", type=float, default=60.0, help="request timeout in seconds")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    api = RecipeAPI(
        args.recipe,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=args.api_path,
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=args.workers_per_device,
        timeout=args.timeout,
        fast_queue=args.fast_queue,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.num_api_servers,
        log_level=args.log_level,
        generate_client_file=False,  # would otherwise write client.py into the cwd
    )


if __name__ == "__main__":
    main()
