"""Prometheus metrics: requests per route, backend operations, the dispatcher, resources by status, replayed
requests, expired reservations, and per storage node its jobs, queue depth and heartbeat age."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.backends.dispatch import Dispatcher
from app.queue import JobQueue

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One registry per app, so several apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tether_http_requests",
            "HTTP requests served, by route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tether_http_request_duration_seconds",
            "Time to serve a request, by route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_duration = Histogram(
            "tether_backend_operation_duration_seconds",
            "Time a backend operation took in the thread pool (queueing included).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_failures = Counter(
            "tether_backend_operation_failures",
            "Backend operations that raised.",
            ["operation"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tether_dispatcher_queue_depth", "Backend calls waiting for a worker.", registry=self.registry
        )
        self.busy_workers = Gauge("tether_dispatcher_busy_workers", "Workers running a call.", registry=self.registry)
        self.volumes = Gauge("tether_volumes", "Volumes by status.", ["status"], registry=self.registry)
        self.attachments = Gauge("tether_attachments", "Attachments by status.", ["status"], registry=self.registry)
        self.replays = Counter(
            "tether_idempotent_replays",
            "Requests answered with the stored answer to their Idempotency-Key, by operation.",
            ["operation"],
            registry=self.registry,
        )
        for operation in ("create_volume", "create_attachment"):  # the two keyed operations, shown from 0
            self.replays.labels(operation)
        self.expired_reservations = Counter(
            "tether_reservations_expired",
            "Reservations removed by the lease (TETHER_RESERVATION_TTL) in this process's sweeps.",
            registry=self.registry,
        )

        self.job_duration = Histogram(
            "tether_node_job_duration_seconds",
            "Jobs by node and operation: on the API, enqueue to outcome as the caller waited; on a node, the run.",
            ["node", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_failures = Counter(
            "tether_node_job_failures",
            "Jobs that failed or had no outcome within TETHER_NODE_TIMEOUT, by node and operation.",
            ["node", "operation"],
            registry=self.registry,
        )
        self.node_queue_depth = Gauge(
            "tether_node_queue_depth", "Jobs waiting in each node's queue.", ["node"], registry=self.registry
        )
        self.heartbeat_age = Gauge(
            "tether_node_heartbeat_age_seconds",
            "Seconds since each node's last heartbeat.",
            ["node"],
            registry=self.registry,
        )
        self.node_up = Gauge("tether_node_up", "1 when the node is up, 0 when down.", ["node"], registry=self.registry)

    def observe_job(self, node: str, operation: str, seconds: float, failed: bool) -> None:
        self.job_duration.labels(node, operation).observe(seconds)
        if failed:
            self.job_failures.labels(node, operation).inc()

    def watch_queue(self, queue: JobQueue) -> None:
        queue.observers.append(self.observe_job)

    def set_nodes(self, nodes: list[tuple[str, float, bool, int | None]]) -> None:
        """(name, heartbeat age, up, queue depth) of every node."""
        for gauge in (self.node_queue_depth, self.heartbeat_age, self.node_up):
            gauge.clear()
        for name, age, up, depth in nodes:
            self.heartbeat_age.labels(name).set(age)
            self.node_up.labels(name).set(1 if up else 0)
            if depth is not None:
                self.node_queue_depth.labels(name).set(depth)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_backend(self, operation: str, seconds: float, failed: bool) -> None:
        self.backend_duration.labels(operation).observe(seconds)
        if failed:
            self.backend_failures.labels(operation).inc()

    def observe_replay(self, operation: str) -> None:
        self.replays.labels(operation).inc()

    def observe_expired(self, count: int) -> None:
        self.expired_reservations.inc(count)

    def watch(self, dispatcher: Dispatcher) -> None:
        dispatcher.observers.append(self.observe_backend)
        self.queue_depth.set_function(lambda: dispatcher.waiting)
        self.busy_workers.set_function(lambda: dispatcher.busy)

    def set_counts(self, volumes: dict[str, int], attachments: dict[str, int]) -> None:
        for gauge, counts in ((self.volumes, volumes), (self.attachments, attachments)):
            gauge.clear()
            for status, count in counts.items():
                gauge.labels(status).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
