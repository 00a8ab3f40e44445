"""Prometheus metrics of one API server process, plus what the store knows about all loops."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fastdeploy.jobs import STARTUP_FAILURE, WorkerInfo

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _StoreCollector(Collector):
    """Queue depth per stage, live loops and their batch sizes, read from the store at scrape time."""

    def __init__(
        self,
        snapshot: Callable[[], tuple[Sequence[int], Sequence[WorkerInfo]]],
        buckets: Sequence[int],
        doorbell_help: Mapping[str, str],
    ) -> None:
        self._snapshot = snapshot
        self._buckets = buckets
        self._doorbell_help = doorbell_help

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        depths, workers = self._snapshot()
        depth = GaugeMetricFamily("fastdeploy_queue_depth", "Jobs waiting to be claimed, per stage", labels=["stage"])
        for stage, value in enumerate(depths):
            depth.add_metric([str(stage)], value)
        yield depth
        alive = GaugeMetricFamily("fastdeploy_workers", "Prediction loops alive and ready, per stage", labels=["stage"])
        size = GaugeMetricFamily("fastdeploy_worker_batch_size", "Batch size each loop measured", labels=["stage", "worker"])
        items = GaugeMetricFamily("fastdeploy_worker_items_total", "Inputs each loop predicted", labels=["stage", "worker"])
        info = GaugeMetricFamily("fastdeploy_worker_info", "Each live loop (always 1): its host and device (cpu or a GPU)",
                                 labels=["stage", "worker", "device", "host"])
        doorbell = {  # counters the loops' doorbells report with each heartbeat
            name: GaugeMetricFamily(f"fastdeploy_worker_{name}_total", f"{text}, per loop", labels=["stage", "worker"])
            for name, text in self._doorbell_help.items()
        }
        hist = HistogramMetricFamily("fastdeploy_batch_size", "Inputs per predictor call, all live loops", labels=["stage"])
        per_stage: dict[int, tuple[list[int], int, int]] = {}
        ready: dict[int, int] = {stage: 0 for stage in range(len(depths))}
        for worker in workers:
            if worker.stats.get(STARTUP_FAILURE):
                continue  # a supervisor's note that this stage's loops fail to start, not a loop
            ready[worker.stage] = ready.get(worker.stage, 0) + int(worker.ready)
            size.add_metric([str(worker.stage), worker.worker_id], worker.batch_size)
            items.add_metric([str(worker.stage), worker.worker_id], worker.stats.get("items", 0))
            info.add_metric([str(worker.stage), worker.worker_id, str(worker.stats.get("device", "")), worker.host], 1)
            for name, family in doorbell.items():
                family.add_metric([str(worker.stage), worker.worker_id], float(worker.stats.get(name, 0.0)))
            counts, calls, total = per_stage.get(worker.stage, ([0] * len(self._buckets), 0, 0))
            for i, value in enumerate(worker.stats.get("batch_buckets", [])[: len(counts)]):
                counts[i] += value
            per_stage[worker.stage] = (
                counts, calls + worker.stats.get("batches", 0), total + worker.stats.get("batch_sum", 0)
            )
        for stage, value in sorted(ready.items()):
            alive.add_metric([str(stage)], value)
        for stage, (counts, calls, total) in sorted(per_stage.items()):
            buckets = [(str(b), c) for b, c in zip(self._buckets, counts)]
            buckets.append(("+Inf", calls))
            hist.add_metric([str(stage)], buckets, total)
        yield alive
        yield size
        yield items
        yield info
        yield from doorbell.values()
        yield hist


class Metrics:
    """The metrics of one API server process.

    With several API server processes on one port (``multiprocess_dir``), request counts
    and latencies are written to files in that folder and every scrape sums all
    processes, so any process answers for the whole service.
    """

    def __init__(
        self,
        snapshot: Callable[[], tuple[Sequence[int], Sequence[WorkerInfo]]],
        batch_buckets: Sequence[int],
        multiprocess_dir: Optional[str] = None,
        doorbell_help: Optional[Mapping[str, str]] = None,
    ) -> None:
        """``doorbell_help``: the counters the doorbells report (name -> help text)."""
        self.registry = CollectorRegistry()
        own = None if multiprocess_dir else self.registry

        self.requests = Counter(
            "fastdeploy_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=own
        )
        self.latency = Histogram(
            "fastdeploy_request_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=own
        )
        doorbell_help = doorbell_help or {}
        self._doorbell = {
            name: Counter(f"fastdeploy_api_{name}", f"{text}, all API server processes", registry=own)
            for name, text in doorbell_help.items()
        }
        self._doorbell_seen: dict[str, float] = {}
        self._requests_source: Collector = _Own(self.requests, self.latency)
        if multiprocess_dir:
            self._requests_source = MultiProcessCollector(None, path=multiprocess_dir)
            self.registry.register(self._requests_source)
        self.registry.register(_StoreCollector(snapshot, batch_buckets, doorbell_help))

    def track_doorbell(self, stats: Mapping[str, float]) -> None:
        """Bring the counters up to this process's doorbell totals (called now and then)."""
        for name, counter in self._doorbell.items():
            value = float(stats.get(name, 0.0))
            delta = value - self._doorbell_seen.get(name, 0.0)
            if delta > 0:
                counter.inc(delta)
                self._doorbell_seen[name] = value

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_summary(self) -> dict[str, Any]:
        """Requests answered per endpoint and status, and the latency histogram per endpoint, as
        running totals of every API server process (the status page derives rates from them)."""
        answered: dict[str, dict[str, int]] = {}
        latency: dict[str, list[int]] = {}
        bounds = [str(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]  # +Inf: requests slower than every bound
        for family in self._requests_source.collect():
            for sample in family.samples:
                endpoint = sample.labels.get("endpoint", "")
                if sample.name == "fastdeploy_requests_total":
                    by_status = answered.setdefault(endpoint, {})
                    by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + int(sample.value)
                elif sample.name == "fastdeploy_request_seconds_bucket" and sample.labels.get("le") in bounds:
                    counts = latency.setdefault(endpoint, [0] * len(bounds))
                    counts[bounds.index(sample.labels["le"])] += int(sample.value)
        return {"answered": answered, "latency": {"bounds": [*LATENCY_BUCKETS, None], "cumulative": latency}}


class _Own(Collector):
    """The request metrics of this process alone (one API server, no shared folder)."""

    def __init__(self, *metrics: Collector) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        for metric in self._metrics:
            yield from metric.collect()
