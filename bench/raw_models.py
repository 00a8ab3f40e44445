"""Raw predictor throughput of fastDeploy recipes, without the server.

Imports a recipe's predictor.py and example.py by path and calls
predictor(batch, batch_size=len(batch)) in a plain loop for batch sizes
1, 2, 4, ... up to --max-batch, filling each batch by cycling the recipe's
`example` list (file recipes get absolute paths). Prints items/s per batch
size and the best batch size. Standard library only; the recipes need their
own requirements installed in the running interpreter.

    python bench/raw_models.py                       # minilm and vad
    python bench/raw_models.py --recipes vad --seconds 0.5 --json /tmp/raw.json
    python bench/raw_models.py --recipes recipes/ocr --max-batch 4
    python bench/raw_models.py --recipes minilm --inputs items.json --threads 2 \
        --batch-sizes 1,16,32,64 --json /tmp/raw.json --rounds 2

--inputs FILE replaces the example with a JSON list of inputs (file recipes:
paths, relative ones resolved against the recipe folder); bench/run.py uses it
to time exactly the item its W3/W4 requests carry.  --threads N sets
OMP_NUM_THREADS & co. before the recipe is imported and torch's thread count
after, as fastDeploy's loop does (default: leave the environment alone).

A recipe that cannot be imported (missing requirements) is reported and skipped.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPES = ["minilm", "vad"]


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def set_threads(threads):
    """Before any recipe import: BLAS / OpenMP / ONNX Runtime (via OMP_NUM_THREADS) threads."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def limit_torch_threads(threads):
    torch = sys.modules.get("torch")
    if torch is not None and threads:
        torch.set_num_threads(threads)


def load_recipe(recipe, inputs=None):
    """recipe: a name under recipes/ or a path to a recipe folder.
    inputs: optional list replacing the recipe's example."""
    folder = recipe if os.path.isdir(recipe) else os.path.join(ROOT, "recipes", recipe)
    folder = os.path.abspath(folder)
    tag = os.path.basename(folder).replace("-", "_")
    sys.path.insert(0, folder)  # a predictor may import files next to it
    try:
        example = _load_module(f"_raw_example_{tag}", os.path.join(folder, "example.py"))
        t0 = time.perf_counter()
        predictor = _load_module(f"_raw_predictor_{tag}", os.path.join(folder, "predictor.py"))
        load_s = time.perf_counter() - t0
    finally:
        sys.path.remove(folder)
    items = list(example.example if inputs is None else inputs)
    if getattr(example, "input_type", "json") == "file":
        items = [os.path.join(folder, p) for p in items]  # absolute paths stay as they are
    return folder, predictor.predictor, items, load_s


def measure(predict, items, batch_size, seconds, min_calls):
    batch = [items[i % len(items)] for i in range(batch_size)]
    out = predict(batch, batch_size=batch_size)  # warm-up
    assert len(out) == batch_size, f"predictor returned {len(out)} outputs for {batch_size} inputs"
    calls, t0 = 0, time.perf_counter()
    while True:
        predict(batch, batch_size=batch_size)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= min_calls:
            break
    return {
        "batch_size": batch_size,
        "calls": calls,
        "seconds": round(elapsed, 4),
        "items_per_s": round(calls * batch_size / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / calls, 3),
        "ms_per_item": round(1000 * elapsed / (calls * batch_size), 4),
    }


def bench_recipe(recipe, batch_sizes, seconds, min_calls, inputs=None, threads=None, rounds=1):
    folder, predict, items, load_s = load_recipe(recipe, inputs)
    limit_torch_threads(threads)
    print(f"\n== {os.path.relpath(folder, ROOT)}  (import+load {load_s:.2f} s, "
          f"{len(items)} {'example' if inputs is None else 'given'} items cycled)")
    print(f"{'batch':>6} {'items/s':>10} {'ms/batch':>10} {'ms/item':>9} {'calls':>6}")
    best_of = {}
    for _ in range(max(1, rounds)):  # the whole sweep again: a passing disturbance hits one round only
        for bs in batch_sizes:
            r = measure(predict, items, bs, seconds, min_calls)
            if bs not in best_of or r["items_per_s"] > best_of[bs]["items_per_s"]:
                best_of[bs] = r
    rows = []
    for bs in batch_sizes:
        r = best_of[bs]
        rows.append(r)
        print(f"{bs:>6} {r['items_per_s']:>10.1f} {r['ms_per_batch']:>10.2f} "
              f"{r['ms_per_item']:>9.3f} {r['calls']:>6}", flush=True)
    best = max(rows, key=lambda r: r["items_per_s"])
    speedup = best["items_per_s"] / rows[0]["items_per_s"]
    print(f"best batch size {best['batch_size']}: {best['items_per_s']:.1f} items/s "
          f"({speedup:.2f}x batch 1)")
    return {"recipe": os.path.relpath(folder, ROOT), "load_seconds": round(load_s, 3),
            "threads": threads or os.environ.get("OMP_NUM_THREADS"),
            "results": rows, "best_batch_size": best["batch_size"],
            "best_items_per_s": best["items_per_s"], "speedup_vs_batch_1": round(speedup, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="comma-separated recipe names under recipes/ or recipe folders "
                         "(default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=128, help="largest batch size (default 128)")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="minimum timed seconds per batch size (default 1.0)")
    ap.add_argument("--min-calls", type=int, default=2, help="minimum timed calls per batch size")
    ap.add_argument("--batch-sizes", help="comma-separated batch sizes (overrides --max-batch)")
    ap.add_argument("--inputs", metavar="FILE",
                    help="JSON list of inputs to cycle instead of each recipe's example")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS & co. and torch threads (default: as set)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole sweep this many times and keep each size's best (default 1)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)

    if args.threads:
        set_threads(args.threads)
    inputs = None
    if args.inputs:
        with open(args.inputs) as f:
            inputs = json.load(f)
    if args.batch_sizes:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    else:
        batch_sizes, b = [], 1
        while b <= args.max_batch:
            batch_sizes.append(b)
            b *= 2
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
          f"batch sizes {batch_sizes}, >= {args.seconds} s each")

    report, failed = {"batch_sizes": batch_sizes, "seconds_per_size": args.seconds,
                      "cpu_count": os.cpu_count(), "recipes": []}, False
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        try:
            report["recipes"].append(bench_recipe(recipe, batch_sizes, args.seconds, args.min_calls,
                                                  inputs, args.threads, args.rounds))
        except Exception as e:
            failed = True
            print(f"\n== {recipe}: SKIPPED ({type(e).__name__}: {e})", file=sys.stderr)
            traceback.print_exc(limit=2)
            report["recipes"].append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
