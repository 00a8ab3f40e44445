"""One-command benchmark: our fastDeploy vs fastDeploy 3.1.1 vs LitServe 0.2.19.

    python bench/run.py [--quick] [--systems ours,ours-rawbatch,fd311,litserve]
                        [--workloads w1,w1i,w2,w3,w4] [--venv-root DIR] [--engine auto|wrk|asyncio]

Workload by workload: time the raw predictor (W3/W4, in a fresh process), then
for each system start it on 127.0.0.1 on a free port, wait until it answers,
check one request, run the closed-loop load at each client count while
sampling the server's memory and counting its predictor calls, and stop it
(ours: SIGTERM to its supervisor, wait, then SIGKILL leftovers; peers: SIGTERM
to all, SIGKILL after 3 s).  Prints one table, writes
bench/results/results.json and bench/results/chart.png.

The peers live in their own venvs under --venv-root (default bench/.venvs/,
git-ignored; env FD_BENCH_VENVS overrides the default); they are created and
pip-installed on first use (W3/W4: plus the recipes' requirements, torch
first).  "ours" runs with the current interpreter.
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


def run_system_workload(system, wl, quick, timing, engine, run_dir, repeat=1, ctx=None):
    """Start `system` for workload `wl`, run every client count, stop it."""
    settings = wl.settings_for(system.key, ctx)
    port = loadgen.free_port()
    os.makedirs(run_dir, exist_ok=True)
    rows = []
    t_start = time.time()
    srv = system.start(settings, port, run_dir)
    config = {}
    try:
        srv.wait_ready(timeout=180 if not quick else 120)
        startup_s = time.time() - t_start
        body = wl.body()
        url = srv.url_for(wl.path) if wl.path else srv.url  # W1I: /infer on every system
        srv.probe(body, wl.items_per_request, wl.content_type, url, wl.decode_answer, wl.expect)
        idle = srv.rss_sampler()
        idle_mb = idle.sample_once() / 2**20
        idle_roles = {k: round(v / 2**20, 1) for k, v in idle.last_roles.items()}
        config = {"settings": {k: v for k, v in settings.items() if k != "recipe"},
                  "recipe": os.path.relpath(settings["recipe"], os.path.dirname(BENCH)),
                  "url": url, "startup_s": round(startup_s, 2)}
        if system.key == "fd311":
            config["batch_size"] = systems.FastDeploy311.chosen_batch_size(srv)
        elif system.key.startswith("ours"):
            config["batch_size"] = srv.batch_size()
        elif "--max-batch-size" in settings.get("args", []):
            config["batch_size"] = int(settings["args"][settings["args"].index("--max-batch-size") + 1])
        log("%s/%s ready in %.1fs on port %d (idle RSS %.0f MB%s)%s" % (
            system.key, wl.key, startup_s, port, idle_mb,
            "".join(", %s %.0f" % kv for kv in sorted(idle_roles.items())),
            " batch size %s" % config["batch_size"] if config.get("batch_size") else ""))
        for clients in wl.clients_for(quick):
            if not srv.alive():
                raise RuntimeError("%s died\n%s" % (system.key, srv.log_tail()))
            before = srv.batch_stats()
            with srv.rss_sampler() as rss:
                runs = [loadgen.run_load(url, body, clients, timing["duration"], timing["warmup"],
                                         wl.items_per_request, engine, wl.content_type)
                        for _ in range(max(1, repeat))]
            after = srv.batch_stats()
            # with --repeat N keep the run with the median throughput
            runs.sort(key=lambda x: x["items_per_s"])
            r = runs[len(runs) // 2]
            if len(runs) > 1:
                r["repeats_items_per_s"] = [round(x["items_per_s"], 1) for x in runs]
            r.update({"system": system.key, "workload": wl.key, "rss_peak_mb": rss.peak_mb,
                      "rss_mean_mb": rss.mean_mb, "rss_idle_mb": idle_mb, "config": config})
            if idle_roles:
                r["rss_idle_by_role_mb"] = idle_roles
                r["rss_peak_by_role_mb"] = rss.role_peaks_mb()
            if before is not None and after is not None and after[0] > before[0]:
                # predictor calls during warm-up + measurement (ours: heartbeat-delayed ~1 s)
                r["mean_batch"] = (after[1] - before[1]) / (after[0] - before[0])
            rows.append(r)
            log("  " + loadgen.format_result(r) + "  RSS %.0f MB%s%s" % (
                rss.peak_mb, "".join(" %s %.0f" % kv for kv in sorted(rss.role_peaks_mb().items())),
                "  mean batch %.1f" % r["mean_batch"] if r.get("mean_batch") else ""))
    finally:
        stop = srv.stop()
        if stop:
            log("%s/%s stopped in %.2fs (%s%s)" % (
                system.key, wl.key, stop["stop_s"],
                "SIGTERM to the supervisor, it exited after %ss" % stop["root_exit_s"]
                if stop["mode"] == "root" else "SIGTERM to all",
                ", %d SIGKILLed" % stop["killed"] if stop["killed"] else ", nothing left to kill"))
            config["stop"] = stop
    return rows


def ratio(a, b):
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def add_ratios(rows, raws=None, parallels=None):
    ours = {(r["workload"], r["clients"]): r for r in rows if r["system"] == "ours"}
    for r in rows:
        raw = (raws or {}).get(r["workload"])
        if raw and r.get("clients") is not None:
            r["over_raw"] = ratio(r["items_per_s"], raw["items_per_s"])
        parallel = (parallels or {}).get(r["workload"])
        if parallel and r.get("clients") is not None:
            r["over_raw_parallel"] = ratio(r["items_per_s"], parallel["items_per_s"])
        o = ours.get((r["workload"], r["clients"]))
        if r["system"] in ("ours", "ours-rawbatch") or o is None or r.get("clients") is None:
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
            "errors", "RSS MB", "batch", "/raw", "/rawP", "ours/peer items/s", "ours/peer p99"]
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append([r["system"], r["workload"]] + ["-"] * (len(head) - 3) + ["skipped (see below)"])
            continue
        batch = "-"
        if r["system"] in ("raw-predictor", "raw-parallel") and r.get("batch_size"):
            batch = "best %d" % r["batch_size"]
        elif r.get("mean_batch") is not None:
            size = (r.get("config") or {}).get("batch_size")
            batch = "%.1f" % r["mean_batch"] + ("/%s" % size if size else "")
        lines.append([
            r["system"], r["workload"], fmt(r.get("clients"), "%d"),
            fmt(r.get("rps")), fmt(r.get("items_per_s")), fmt(r.get("p50_ms"), "%.2f"),
            fmt(r.get("p99_ms"), "%.2f"), fmt(r.get("errors"), "%d"), fmt(r.get("rss_peak_mb"), "%.0f"),
            batch, fmt(r.get("over_raw"), "%.2f"), fmt(r.get("over_raw_parallel"), "%.2f"),
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
          "lower p99.  RSS MB: peak sum of RSS over the server's processes during the run.\n"
          "batch: mean inputs per predictor call during the point / the batch size the system "
          "used (ours: measured, fd311: searched, litserve: max_batch_size); raw-predictor: its best "
          "batch size.  /raw: served items/s over the raw predictor's best items/s in this run (one\n"
          "process, threads = cores: the issue's baseline).  /rawP: over raw-parallel, the predictor in one\n"
          "process per core side by side (1 thread each): the most a layout of that many loops can serve.")
    for r in rows:
        if r.get("skipped"):
            print("SKIPPED: %s/%s: %s" % (r["system"], r["workload"], r["skipped"]))
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


COLORS = {"ours": "#1f77b4", "ours-rawbatch": "#9ecae1", "fd311": "#ff7f0e", "litserve": "#2ca02c"}


def draw_chart(rows, path, title):
    """One column per workload (each with its own scale): items/s on top, p99 below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("clients") is not None]
    wls = []
    for r in measured:
        if r["workload"] not in wls:
            wls.append(r["workload"])
    if not wls:
        return False
    sysnames = [s for s in ("ours", "ours-rawbatch", "fd311", "litserve") if any(r["system"] == s for r in measured)]
    sysnames += sorted({r["system"] for r in measured} - set(sysnames))
    ncol = [len({r["clients"] for r in measured if r["workload"] == w}) for w in wls]
    fig, axes = plt.subplots(2, len(wls), figsize=(max(9, 2.4 * sum(ncol) + 1.5), 8.5),
                             gridspec_kw={"width_ratios": ncol}, squeeze=False)
    for c, w in enumerate(wls):
        clients = sorted({r["clients"] for r in measured if r["workload"] == w})
        here = [s for s in sysnames if any(r["system"] == s and r["workload"] == w for r in measured)]
        width = 0.8 / max(1, len(here))
        for ax, key, ylabel in ((axes[0][c], "items_per_s", "items/s (higher is better)"),
                                (axes[1][c], "p99_ms", "p99 ms (lower is better, log)")):
            for i, s in enumerate(here):
                xs, ys = [], []
                for j, n in enumerate(clients):
                    r = next((r for r in measured if r["system"] == s and r["workload"] == w
                              and r["clients"] == n), None)
                    if r is not None and r.get(key) is not None and not math.isnan(r[key]):
                        xs.append(j + (i - (len(here) - 1) / 2) * width)
                        ys.append(r[key])
                bars = ax.bar(xs, ys, width, label=s, color=COLORS.get(s))
                for b, y in zip(bars, ys):
                    ax.annotate("%.0f" % y if y >= 10 else "%.1f" % y, (b.get_x() + b.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(clients)))
            ax.set_xticklabels(["%d client%s" % (n, "" if n == 1 else "s") for n in clients], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            if c == 0:
                ax.set_ylabel(ylabel)
            if key == "p99_ms":
                ax.set_yscale("log")
        wl = workloads.WORKLOADS.get(w)
        axes[0][c].set_title("%s %s" % (w.upper(), wl.name if wl else ""), fontsize=10)
        # reference lines: W2's physical limit, W3/W4's raw predictor
        for ref in rows:
            if ref["workload"] != w or ref.get("clients") is not None:
                continue
            if ref["system"] == "physical-limit":
                label, color = "physical limit %.0f" % ref["items_per_s"], "red"
            elif ref["system"] == "raw-predictor" and ref.get("batch_size"):
                label, color = "raw predictor, batch %d: %.0f" % (ref["batch_size"], ref["items_per_s"]), "purple"
            elif ref["system"] == "raw-parallel" and ref.get("batch_size"):
                label, color = "raw, %d processes side by side: %.0f" % (
                    ref.get("processes") or 0, ref["items_per_s"]), "green"
            else:
                continue
            axes[0][c].axhline(ref["items_per_s"], color=color, linestyle="dashed", label=label)
            if ref["system"] == "raw-predictor":
                axes[0][c].axhline(0.9 * ref["items_per_s"], color=color, linestyle="dotted", linewidth=0.8,
                                   label="90% of raw")
        tops = [r["items_per_s"] for r in rows if r["workload"] == w and r.get("items_per_s")]
        if tops:
            axes[0][c].set_ylim(0, 1.35 * max(tops))  # room for the legend
        skipped = [r["system"] for r in rows if r["workload"] == w and r.get("skipped")]
        if skipped:
            axes[0][c].text(0.02, 0.02, "skipped: %s (see results.json)" % ", ".join(skipped),
                            transform=axes[0][c].transAxes, fontsize=7, color="gray")
        axes[0][c].legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (whole thing < 5 min)")
    p.add_argument("--systems", default="ours,ours-rawbatch,fd311,litserve",
                   help="ours-rawbatch (ours with BATCH_SIZE = the raw best) runs on W3/W4 only")
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
                                   "body_bytes": len(wl.body()),
                                   "path": wl.path, "content_type": wl.content_type,
                                   "skip": wl.skip or None}
    # the model workloads' requirements (torch first), installed into the peers' venvs
    requirements = []
    for wkey in wl_keys:
        for step in workloads.WORKLOADS[wkey].requirements:
            if step not in requirements:
                requirements.append(step)
    ready = []
    for skey in sys_keys:
        system = systems.SYSTEMS[skey]
        try:
            system.prepare(venv_root, log, requirements)
            meta["versions"][skey] = system.version()
            ready.append(skey)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            log("skipping %s: %s" % (skey, e))
            for wkey in wl_keys:
                failures.append({"system": skey, "workload": wkey, "error": "prepare: %s" % e})
    # workload by workload, so the raw predictor and the systems serving it are
    # measured close together in time (the machine is shared and drifts)
    raws, parallels, cores = {}, {}, os.cpu_count() or 1
    for wkey in wl_keys:
        wl = workloads.WORKLOADS[wkey]
        ctx = {"raw": None, "cores": cores}
        if wl.raw:
            try:
                raws[wkey] = ctx["raw"] = workloads.measure_raw(wl, a.quick, systems.SYSTEMS["ours"].python,
                                                                log, cores)
            except Exception as e:  # noqa: BLE001
                log("FAILED raw predictor of %s: %s" % (wkey, e))
                failures.append({"system": "raw-predictor", "workload": wkey, "error": str(e)})
            if cores > 1:
                try:
                    parallels[wkey] = workloads.measure_raw(wl, a.quick, systems.SYSTEMS["ours"].python,
                                                            log, cores, processes=cores)
                except Exception as e:  # noqa: BLE001
                    log("FAILED raw predictor of %s in %d processes: %s" % (wkey, cores, e))
                    failures.append({"system": "raw-parallel", "workload": wkey, "error": str(e)})
        for skey in ready:
            if skey in wl.skip:
                extras.append({"system": skey, "workload": wkey, "clients": None, "skipped": wl.skip[skey]})
                continue
            if skey not in wl.systems:
                continue
            run_dir = os.path.join(RUNS, "%s-%s" % (skey, wkey))
            try:
                rows += run_system_workload(systems.SYSTEMS[skey], wl, a.quick, timing, engine, run_dir,
                                            a.repeat, ctx)
            except Exception as e:  # noqa: BLE001
                log("FAILED %s/%s: %s" % (skey, wkey, e))
                if os.environ.get("FD_BENCH_DEBUG"):
                    traceback.print_exc()
                failures.append({"system": skey, "workload": wkey, "error": str(e)})
        if wl.extras:
            extras += wl.extras(a.quick)
    extras += list(raws.values()) + list(parallels.values())

    add_ratios(rows, raws, parallels)
    all_rows = rows + extras
    order = {k: i for i, k in enumerate(wl_keys)}
    sorder = {k: i for i, k in enumerate(sys_keys + ["raw-predictor", "raw-parallel", "physical-limit"])}
    all_rows.sort(key=lambda r: (order.get(r["workload"], 99), sorder.get(r["system"], 99),
                                 r.get("clients") or 0))
    # how long each system took to stop, per workload (ours: SIGTERM to the supervisor)
    meta["stops"] = {}
    for r in rows:
        stop = (r.get("config") or {}).get("stop")
        if stop:
            meta["stops"].setdefault(r["system"], {})[r["workload"]] = stop
    meta["elapsed_s"] = round(time.time() - t0, 1)

    print()
    print_table(all_rows, failures)
    for skey, per in meta["stops"].items():
        print("stop %s: %s" % (skey, ", ".join(
            "%s %.2fs%s" % (w, st["stop_s"], " (%d SIGKILLed)" % st["killed"] if st["killed"] else "")
            for w, st in per.items())))
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
