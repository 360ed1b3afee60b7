"""Prometheus metrics through Ray's metrics API (``ray.util.metrics``).

Each node's metrics agent exports them on its metrics export port (``ray.nodes()``'
``MetricsExportPort``; the cluster's Prometheus scrapes it) beside Ray's and Serve's own, with
Ray's ``ray_`` prefix (counters end in ``_total``, histograms have ``_bucket/_sum/_count``):

ingress:  ray_sense_requests_total{route, status}          requests by route and HTTP status
          ray_sense_request_latency_seconds{route}         end-to-end latency
          ray_sense_time_to_first_token_seconds{route}     streaming requests
decoder:  ray_sense_generated_tokens_total{method}         completion tokens
          ray_sense_prompt_tokens_total{method}
          ray_sense_cached_prompt_tokens_total{method}     of those, taken from the prefix cache
          ray_sense_drafted_tokens_total{method}, ray_sense_accepted_tokens_total{method}
          ray_sense_mat{method}                            mean accepted tokens per step, per request
          ray_sense_acceptance_rate{method}                accepted / drafted, per request
          ray_sense_decode_tokens_per_second{method}
          ray_sense_cancelled_requests_total{method}       the client went away
          ray_sense_index_fallbacks_total{method}          shards unavailable: PLD drafting instead
          ray_sense_active_generations                     per decoder replica
          ray_sense_batch_requests, ray_sense_batch_rows   with batching: requests and tree rows
                                                           per verification forward
          ray_sense_batch_waiting                          requests admitted, not yet prefilled
          ray_sense_batch_forwards_total                   verification forwards run
shards:   ray_sense_index_searches_total, ray_sense_index_batch_size
"""

from __future__ import annotations

_LATENCY = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_MAT = [1.0, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8]
_RATE = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
_TPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


def _metrics():
    from ray.util import metrics

    return metrics


class IngressMetrics:
    def __init__(self) -> None:
        m = _metrics()
        self.requests = m.Counter("sense_requests", "HTTP requests by route and status", tag_keys=("route", "status"))
        self.latency = m.Histogram("sense_request_latency_seconds", "request latency", boundaries=_LATENCY,
                                   tag_keys=("route",))
        self.ttft = m.Histogram("sense_time_to_first_token_seconds", "time to the first streamed token",
                                boundaries=_LATENCY, tag_keys=("route",))

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def first_token(self, route: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"route": route})


class DecoderMetrics:
    def __init__(self) -> None:
        m = _metrics()
        tags = ("method",)
        self.generated = m.Counter("sense_generated_tokens", "completion tokens", tag_keys=tags)
        self.prompt = m.Counter("sense_prompt_tokens", "prompt tokens", tag_keys=tags)
        self.cached = m.Counter("sense_cached_prompt_tokens", "prompt tokens taken from the prefix cache",
                                tag_keys=tags)
        self.drafted = m.Counter("sense_drafted_tokens", "draft tokens sent to verification", tag_keys=tags)
        self.accepted = m.Counter("sense_accepted_tokens", "draft tokens accepted", tag_keys=tags)
        self.mat = m.Histogram("sense_mat", "mean accepted tokens per verification step", boundaries=_MAT,
                               tag_keys=tags)
        self.acceptance = m.Histogram("sense_acceptance_rate", "accepted / drafted tokens", boundaries=_RATE,
                                      tag_keys=tags)
        self.tps = m.Histogram("sense_decode_tokens_per_second", "decode speed per request", boundaries=_TPS,
                               tag_keys=tags)
        self.cancelled = m.Counter("sense_cancelled_requests", "generations stopped by a disconnect", tag_keys=tags)
        self.fallbacks = m.Counter("sense_index_fallbacks", "requests that fell back to PLD drafting",
                                   tag_keys=tags)
        self.active = m.Gauge("sense_active_generations", "generations running in this replica")
        self.batch_requests = m.Histogram("sense_batch_requests", "requests verified per forward (batching)",
                                          boundaries=_BATCH)
        self.batch_rows = m.Histogram("sense_batch_rows", "tree rows verified per forward (batching)",
                                      boundaries=[*_BATCH, 256, 512])
        self.batch_waiting = m.Gauge("sense_batch_waiting", "requests admitted to the batch loop, not yet prefilled")
        self.forwards = m.Counter("sense_batch_forwards", "verification forwards of the batch loop")

    def batch_step(self, scheduler) -> None:
        """After each step of the batch loop (on its thread): the forward's size and the queue."""
        self.batch_waiting.set(len(scheduler.waiting))
        if scheduler.last_forward is not None:
            requests, rows = scheduler.last_forward
            self.batch_requests.observe(requests)
            self.batch_rows.observe(rows)
            self.forwards.inc(1)

    def finished(self, method: str, stats, fallback: bool) -> None:
        t = {"method": method}
        self.generated.inc(stats.new_tokens, tags=t)
        self.prompt.inc(stats.prompt_tokens, tags=t)
        if stats.cached_tokens:
            self.cached.inc(stats.cached_tokens, tags=t)
        if stats.drafted:
            self.drafted.inc(stats.drafted, tags=t)
        if stats.accepted:
            self.accepted.inc(stats.accepted, tags=t)
        if stats.steps:
            self.mat.observe(stats.mat, tags=t)
        if stats.drafted:
            self.acceptance.observe(stats.acceptance_rate, tags=t)
        if stats.tokens_per_s > 0:
            self.tps.observe(stats.tokens_per_s, tags=t)
        if stats.finish_reason == "cancelled":
            self.cancelled.inc(1, tags=t)
        if fallback:
            self.fallbacks.inc(1, tags=t)


class ShardMetrics:
    def __init__(self) -> None:
        m = _metrics()
        self.searches = m.Counter("sense_index_searches", "dense searches served by this shard")
        self.batch = m.Histogram("sense_index_batch_size", "searches per batched FAISS call", boundaries=_BATCH)
