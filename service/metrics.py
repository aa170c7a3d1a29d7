"""The Prometheus metrics the service exports at /metrics, in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
ENDPOINTS = {"/", "/search", "/match", "/match/batch", "/items", "/healthz", "/readyz", "/metrics", "/admin/reload"}


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fashionbert_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("fashionbert_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.stage = Histogram("fashionbert_stage_seconds", "time per search stage", ["stage"], buckets=LATENCY_BUCKETS,
                               registry=r)
        self.batch = Histogram("fashionbert_rerank_batch_pairs", "pairs per cross-encoder run",
                               buckets=(1, 5, 10, 20, 40, 80, 160), registry=r)
        self.index_size = Gauge("fashionbert_index_items", "items in the index", registry=r)
        self.in_flight = Gauge("fashionbert_requests_in_flight", "requests being served", registry=r)
        self.rejected = Counter("fashionbert_rejected_busy", "requests turned away with 503: too many in flight "
                                "(concurrency) or more work admitted than the deadline allows (capacity)", ["reason"],
                                registry=r)
        self.admitted_work = Gauge("fashionbert_admitted_work_seconds", "predicted seconds of model work admitted and "
                                   "not finished", registry=r)
        # The share of answers that lost their rerank: rerank_lost / rerank_requested.
        self.rerank_requested = Counter("fashionbert_search_rerank_requested", "text searches that asked for a rerank",
                                        registry=r)
        self.rerank_lost = Counter("fashionbert_search_rerank_lost", "text searches answered in the recall order "
                                   "because the rerank missed the deadline", registry=r)
        self.engines_retired = Gauge("fashionbert_engines_retired", "engines replaced by a reload and still "
                                     "finishing requests", registry=r)
        self.build = Info("fashionbert_build", "model and index loaded", registry=r)


def endpoint_label(path: str) -> str:
    """The route a path belongs to: item ids are folded, so the label set stays small."""
    if path.startswith("/items/"):
        return "/items/{id}/image" if path.endswith("/image") else "/items/{id}"
    return path if path in ENDPOINTS else "other"
