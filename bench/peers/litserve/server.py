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
"""
import argparse
import importlib.util
import os
import sys

import litserve as ls
from fastapi import HTTPException


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecipeAPI(ls.LitAPI):
    """Wraps a recipe's predictor() in LitServe's hook pipeline."""

    def __init__(self, recipe_dir, **kwargs):
        super().__init__(**kwargs)
        self.recipe_dir = os.path.abspath(recipe_dir)

    def setup(self, device):
        # runs once in every inference worker process
        sys.path.insert(0, self.recipe_dir)
        self._predictor = _load_module(
            os.path.join(self.recipe_dir, "predictor.py"), "recipe_predictor"
        ).predictor
        example = _load_module(
            os.path.join(self.recipe_dir, "example.py"), "recipe_example"
        ).example
        for _ in range(3):  # warm-up, as fastDeploy does
            self._predictor(list(example))

    # NOTE: LitServe looks the parameter up by the name "request"; with no type
    # annotation it passes the parsed JSON body (request.json()).
    def decode_request(self, request):
        try:
            data = request["data"]
        except (KeyError, TypeError):
            raise HTTPException(400, 'body must be {"data": [...]}')
        if not isinstance(data, list):
            raise HTTPException(400, '"data" must be a list')
        return data

    def predict(self, x):
        if self.max_batch_size == 1:
            # SingleLoop: x is one request's list of items
            return self._predictor(x, batch_size=1)
        # BatchedLoop: x is a list of per-request item lists
        flat = [item for request_items in x for item in request_items]
        outputs = list(self._predictor(flat, batch_size=self.max_batch_size))
        if len(outputs) != len(flat):
            raise HTTPException(500, "predictor returned a wrong number of outputs")
        per_request, start = [], 0
        for request_items in x:
            per_request.append(outputs[start : start + len(request_items)])
            start += len(request_items)
        return per_request

    def encode_response(self, output):
        return {"success": True, "prediction": list(output)}


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
