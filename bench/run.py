"""One-command benchmark: our fastDeploy vs fastDeploy 3.1.1 vs LitServe 0.2.19.

    python bench/run.py [--quick] [--systems ours,fd311,litserve] [--workloads w1,w2]
                        [--venv-root DIR] [--engine auto|wrk|asyncio]

For each system (one at a time) and workload: start the system on 127.0.0.1
on a free port, wait until it answers, check one request, run the closed-loop
load at each client count while sampling the server's memory, stop it (kill
its process group).  Prints one table, writes bench/results/results.json and
bench/results/chart.png.

The peers live in their own venvs under --venv-root (default bench/.venvs/,
git-ignored; env FD_BENCH_VENVS overrides the default); they are created and
pip-installed on first use.  "ours" runs with the current interpreter.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402

RESULTS = os.path.join(BENCH, "results")
RUNS = os.path.join(BENCH, ".runs")

QUICK = {"warmup": 1.0, "duration": 4.0}
FULL = {"warmup": 3.0, "duration": 15.0}


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def run_system_workload(system, wl, quick, timing, engine, run_dir, repeat=1):
    """Start `system` for workload `wl`, run every client count, stop it."""
    settings = wl.systems[system.key]
    port = loadgen.free_port()
    os.makedirs(run_dir, exist_ok=True)
    rows = []
    t_start = time.time()
    srv = system.start(settings, port, run_dir)
    try:
        srv.wait_ready(timeout=180 if not quick else 120)
        startup_s = time.time() - t_start
        body = wl.body()
        srv.probe(body, wl.items_per_request, wl.content_type)
        idle_mb = srv.rss_sampler().sample_once() / 2**20
        config = {"settings": {k: v for k, v in settings.items() if k != "recipe"},
                  "recipe": os.path.relpath(settings["recipe"], os.path.dirname(BENCH)),
                  "startup_s": round(startup_s, 2)}
        if system.key == "fd311":
            config["fd311_batch_size"] = systems.FastDeploy311.chosen_batch_size(srv)
        log("%s/%s ready in %.1fs on port %d (idle RSS %.0f MB)%s" % (
            system.key, wl.key, startup_s, port, idle_mb,
            " batch size %s" % config.get("fd311_batch_size") if system.key == "fd311" else ""))
        for clients in wl.clients_for(quick):
            if not srv.alive():
                raise RuntimeError("%s died\n%s" % (system.key, srv.log_tail()))
            with srv.rss_sampler() as rss:
                runs = [loadgen.run_load(srv.url, body, clients, timing["duration"], timing["warmup"],
                                         wl.items_per_request, engine, wl.content_type)
                        for _ in range(max(1, repeat))]
            # with --repeat N keep the run with the median throughput
            runs.sort(key=lambda x: x["items_per_s"])
            r = runs[len(runs) // 2]
            if len(runs) > 1:
                r["repeats_items_per_s"] = [round(x["items_per_s"], 1) for x in runs]
            r.update({"system": system.key, "workload": wl.key, "rss_peak_mb": rss.peak_mb,
                      "rss_mean_mb": rss.mean_mb, "rss_idle_mb": idle_mb, "config": config})
            rows.append(r)
            log("  " + loadgen.format_result(r) + "  RSS %.0f MB" % rss.peak_mb)
    finally:
        srv.stop()
    return rows


def ratio(a, b):
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def add_ratios(rows):
    ours = {(r["workload"], r["clients"]): r for r in rows if r["system"] == "ours"}
    for r in rows:
        o = ours.get((r["workload"], r["clients"]))
        if r["system"] in ("ours",) or o is None or r.get("clients") is None:
            r["ours_over_peer_items"] = r["ours_over_peer_p99"] = None
            continue
        r["ours_over_peer_items"] = ratio(o["items_per_s"], r["items_per_s"])
        r["ours_over_peer_p99"] = ratio(o["p99_ms"], r.get("p99_ms"))


def fmt(v, spec="%.1f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return spec % v


def print_table(rows, failures):
    head = ["system", "workload", "clients", "req/s", "items/s", "p50 ms", "p99 ms",
            "errors", "RSS MB", "ours/peer items/s", "ours/peer p99"]
    lines = []
    for r in rows:
        lines.append([
            r["system"], r["workload"], fmt(r.get("clients"), "%d"),
            fmt(r.get("rps")), fmt(r.get("items_per_s")), fmt(r.get("p50_ms"), "%.2f"),
            fmt(r.get("p99_ms"), "%.2f"), fmt(r.get("errors"), "%d"), fmt(r.get("rss_peak_mb"), "%.0f"),
            fmt(r.get("ours_over_peer_items"), "%.2fx"), fmt(r.get("ours_over_peer_p99"), "%.2fx"),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    sep = "  "
    out = [sep.join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append(sep.join("-" * w for w in widths))
    for l in lines:
        out.append(sep.join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(l, widths))))
    print("\n".join(out))
    print("ours/peer items/s > 1: ours has the higher throughput; ours/peer p99 < 1: ours has the "
          "lower p99.  RSS MB: peak sum of RSS over the server's processes during the run.")
    for f in failures:
        lines = [l for l in f["error"].splitlines() if l.strip()] or [""]
        print("FAILED: %s/%s: %s%s" % (f["system"], f["workload"], lines[0],
                                       (" ... " + lines[-1].strip()) if len(lines) > 1 else ""))


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    log("installing matplotlib into %s" % sys.executable)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "matplotlib"])
    if r.returncode != 0:
        return False
    import importlib
    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


COLORS = {"ours": "#1f77b4", "fd311": "#ff7f0e", "litserve": "#2ca02c"}


def draw_chart(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("clients") is not None]
    points = []  # (workload, clients) in first-seen order
    for r in measured:
        k = (r["workload"], r["clients"])
        if k not in points:
            points.append(k)
    sysnames = [s for s in ("ours", "fd311", "litserve") if any(r["system"] == s for r in measured)]
    sysnames += sorted({r["system"] for r in measured} - set(sysnames))
    if not points:
        return False
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(points) + 3), 8.5))
    width = 0.8 / max(1, len(sysnames))
    for ax, key, ylabel in ((axes[0], "items_per_s", "items/s (higher is better)"),
                            (axes[1], "p99_ms", "p99 latency ms (lower is better, log)")):
        for i, s in enumerate(sysnames):
            xs, ys = [], []
            for j, p in enumerate(points):
                r = next((r for r in measured if r["system"] == s and (r["workload"], r["clients"]) == p), None)
                if r is not None and r.get(key) is not None and not math.isnan(r[key]):
                    xs.append(j + (i - (len(sysnames) - 1) / 2) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=s, color=COLORS.get(s))
            for b, y in zip(bars, ys):
                ax.annotate("%.0f" % y if y >= 10 else "%.1f" % y, (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(["%s\n%d client%s" % (p[0], p[1], "" if p[1] == 1 else "s") for p in points])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if key == "p99_ms":
            ax.set_yscale("log")
    limit = next((r for r in rows if r["system"] == "physical-limit"), None)
    if limit:
        w2 = [j for j, p in enumerate(points) if p[0] == limit["workload"]]
        if w2:
            axes[0].hlines(limit["items_per_s"], min(w2) - 0.45, max(w2) + 0.45, colors="red",
                           linestyles="dashed", label="W2 physical limit (%.0f items/s)" % limit["items_per_s"])
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (whole thing < 5 min)")
    p.add_argument("--systems", default="ours,fd311,litserve")
    p.add_argument("--workloads", default=",".join(workloads.WORKLOADS))
    p.add_argument("--venv-root", default=os.environ.get("FD_BENCH_VENVS", os.path.join(BENCH, ".venvs")),
                   help="where the peers' venvs live (default bench/.venvs, or $FD_BENCH_VENVS)")
    p.add_argument("--engine", choices=["auto", "wrk", "asyncio"], default="auto",
                   help="load generator (auto: wrk when on PATH)")
    p.add_argument("--duration", type=float, help="seconds measured per point (overrides the mode)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per point (overrides the mode)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each point N times and keep the median (the machine is noisy)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the load generator ceiling check")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--out", default=RESULTS, help="results folder (default bench/results)")
    a = p.parse_args(argv)

    timing = dict(QUICK if a.quick else FULL)
    if a.duration:
        timing["duration"] = a.duration
    if a.warmup is not None:
        timing["warmup"] = a.warmup
    sys_keys = [s.strip() for s in a.systems.split(",") if s.strip()]
    wl_keys = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for s in sys_keys:
        if s not in systems.SYSTEMS:
            p.error("unknown system %r (known: %s)" % (s, ", ".join(systems.SYSTEMS)))
    for w in wl_keys:
        if w not in workloads.WORKLOADS:
            p.error("unknown workload %r (known: %s)" % (w, ", ".join(workloads.WORKLOADS)))
    engine = a.engine
    if engine == "auto":
        engine = "wrk" if loadgen.wrk_available() else "asyncio"
    venv_root = os.path.abspath(a.venv_root)
    os.makedirs(a.out, exist_ok=True)
    shutil.rmtree(RUNS, ignore_errors=True)
    t0 = time.time()
    log("mode=%s engine=%s systems=%s workloads=%s venvs=%s" % (
        "quick" if a.quick else "full", engine, ",".join(sys_keys), ",".join(wl_keys), venv_root))

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if a.quick else "full", "timing": timing, "engine": engine,
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "repeat": a.repeat,
        "versions": {}, "workloads": {},
    }
    if engine == "wrk":
        try:
            meta["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        except OSError:
            pass
    if not a.no_ceiling:
        c = loadgen.measure_ceiling(duration=2.0, clients=(64,), engines=[engine])[0]
        meta["loadgen_ceiling"] = c
        log("load generator ceiling (%s, 64 clients, trivial server): %.0f req/s p99 %.2f ms" % (
            engine, c["rps"], c["p99_ms"]))

    rows, failures, extras = [], [], []
    for wkey in wl_keys:
        wl = workloads.WORKLOADS[wkey]
        meta["workloads"][wkey] = {"name": wl.name, "description": wl.description,
                                   "clients": wl.clients_for(a.quick),
                                   "items_per_request": wl.items_per_request,
                                   "body_bytes": len(wl.body())}
    for skey in sys_keys:
        system = systems.SYSTEMS[skey]
        try:
            system.prepare(venv_root, log)
            meta["versions"][skey] = system.version()
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            log("skipping %s: %s" % (skey, e))
            for wkey in wl_keys:
                failures.append({"system": skey, "workload": wkey, "error": "prepare: %s" % e})
            continue
        for wkey in wl_keys:
            wl = workloads.WORKLOADS[wkey]
            if skey not in wl.systems:
                continue
            run_dir = os.path.join(RUNS, "%s-%s" % (skey, wkey))
            try:
                rows += run_system_workload(system, wl, a.quick, timing, engine, run_dir, a.repeat)
            except Exception as e:  # noqa: BLE001
                log("FAILED %s/%s: %s" % (skey, wkey, e))
                if os.environ.get("FD_BENCH_DEBUG"):
                    traceback.print_exc()
                failures.append({"system": skey, "workload": wkey, "error": str(e)})
    for wkey in wl_keys:
        wl = workloads.WORKLOADS[wkey]
        if wl.extras:
            extras += wl.extras(a.quick)

    add_ratios(rows)
    all_rows = rows + extras
    order = {k: i for i, k in enumerate(wl_keys)}
    sorder = {k: i for i, k in enumerate(sys_keys + ["raw-predictor", "physical-limit"])}
    all_rows.sort(key=lambda r: (order.get(r["workload"], 99), sorder.get(r["system"], 99),
                                 r.get("clients") or 0))
    meta["elapsed_s"] = round(time.time() - t0, 1)

    print()
    print_table(all_rows, failures)
    out_json = os.path.join(a.out, "results.json")
    with open(out_json, "w") as f:
        json.dump({"meta": meta, "results": all_rows, "failures": failures}, f, indent=2, default=str)
    log("wrote %s" % os.path.relpath(out_json))
    if not a.no_chart:
        if ensure_matplotlib():
            chart = os.path.join(a.out, "chart.png")
            title = "fastDeploy benchmark (%s, %s, %d cores, %s)" % (
                meta["mode"], engine, os.cpu_count(), meta["date"][:16])
            if draw_chart(all_rows, chart, title):
                log("wrote %s" % os.path.relpath(chart))
        else:
            log("matplotlib unavailable: no chart")
    log("done in %.0fs" % (time.time() - t0))
    return 1 if failures and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
