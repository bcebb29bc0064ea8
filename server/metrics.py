"""Prometheus metrics: per-model request/token counters and TTFT/ITL/e2e histograms (model label capped),
HTTP counters, and engine gauges read from engine.stats() at scrape time."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .client import EngineStats
from .sequence import RequestOutput

PREFIX = "chatglm"
OTHER = "other"
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
HTTP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Outcome(str, Enum):
    SUCCESS = "success"
    ERROR = "error"
    CLIENT_GONE = "client_gone"


class ModelLabels:
    """Label values for model ids: the first `cap` ids seen keep their name, later ones become "other",
    so a server with thousands of adapters cannot blow up the series count."""

    def __init__(self, cap: int, always: Callable[[], str] | None = None):
        self.cap = cap
        self.always = always
        self.admitted: set[str] = set()

    def __call__(self, model: str) -> str:
        if model in self.admitted or (self.always is not None and model == self.always()):
            return model
        if len(self.admitted) < self.cap:
            self.admitted.add(model)
            return model
        return OTHER


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], labels: ModelLabels):
        self.stats = stats
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.stats()
        for name, doc, value in (
            ("num_requests_running", "Sequences being decoded now.", s.num_running),
            ("num_requests_waiting", "Sequences queued for admission.", s.num_waiting),
            ("kv_cache_used_tokens", "KV cache slots in use.", s.kv_used_tokens),
            ("kv_cache_capacity_tokens", "KV cache slots in total.", s.kv_capacity_tokens),
            ("kv_cache_usage_ratio", "Used over total KV cache slots.",
             s.kv_used_tokens / s.kv_capacity_tokens if s.kv_capacity_tokens else 0.0),
            ("resident_adapters", "Adapters whose prefix KV is resident.", s.num_resident_adapters),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        per_model = GaugeMetricFamily(f"{PREFIX}_engine_model_stat", "Engine counters per model (from stats()).",
                                      labels=["model", "stat"])
        totals: dict[tuple[str, str], float] = {}
        for model, counters in s.per_model.items():
            for stat, value in counters.items():
                key = (self.labels(model), stat)
                totals[key] = totals.get(key, 0.0) + float(value)
        for (model, stat), value in sorted(totals.items()):
            per_model.add_metric([model, stat], value)
        yield per_model


class Metrics:
    def __init__(self, max_models: int, base_model: Callable[[], str]):
        self.registry = CollectorRegistry()
        self.labels = ModelLabels(max_models, base_model)
        r, m = self.registry, ["model"]
        self.requests = Counter(f"{PREFIX}_requests", "Generation requests by model, endpoint and outcome.",
                                ["model", "endpoint", "outcome"], registry=r)
        self.finished = Counter(f"{PREFIX}_choices_finished", "Finished choices by finish reason.",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", m, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Request arrival to first token of a choice.",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Gap between tokens of a choice.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request arrival to last token.",
                             m, buckets=E2E_BUCKETS, registry=r)
        self.preprocess = Histogram(f"{PREFIX}_http_preprocess_seconds", "Request arrival to engine.generate "
                                    "accepting it (parse, validate, template, tokenize).", buckets=HTTP_BUCKETS,
                                    registry=r)
        self.first_write = Histogram(f"{PREFIX}_http_first_chunk_seconds", "First engine output to its first SSE "
                                     "chunk handed to the server.", buckets=HTTP_BUCKETS, registry=r)
        self.http = Counter(f"{PREFIX}_http_requests", "HTTP requests by route template and status.",
                            ["route", "status"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}_http_requests_in_progress", "HTTP requests being handled.", registry=r)
        self.adapter_events = Counter(f"{PREFIX}_adapter_events", "Adapter admin actions and their outcome.",
                                      ["model", "action", "outcome"], registry=r)

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        self.registry.register(_EngineCollector(stats, self.labels))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, endpoint: str, model_of: Callable[[int], str], start: float) -> "RequestTracker":
        return RequestTracker(self, endpoint, model_of, start)


@dataclass
class _ChoiceClock:
    model: str
    last: float
    tokens: int = 0


@dataclass
class RequestTracker:
    """Timing and token accounting of one generation request; `model_of(choice_index)` names the model."""

    metrics: Metrics
    endpoint: str
    model_of: Callable[[int], str]
    start: float  # request arrival (time.perf_counter)
    choices: dict[int, _ChoiceClock] = field(default_factory=dict)
    prompts: dict[int, tuple[str, int]] = field(default_factory=dict)  # target -> (label, prompt tokens)
    done: bool = False

    def output(self, out: RequestOutput, target: int) -> None:
        now = time.perf_counter()
        clock = self.choices.get(out.index)
        if clock is None:
            clock = self.choices[out.index] = _ChoiceClock(self.metrics.labels(self.model_of(out.index)), now)
            self.metrics.ttft.labels(clock.model).observe(now - self.start)
            self.prompts[target] = (clock.model, out.prompt_tokens)
        elif out.token_ids:
            gap = (now - clock.last) / len(out.token_ids)
            for _ in out.token_ids:
                self.metrics.itl.labels(clock.model).observe(gap)
        clock.last = now
        clock.tokens = max(clock.tokens, out.completion_tokens)
        if out.finish_reason is not None:
            self.metrics.finished.labels(clock.model, out.finish_reason.value).inc()

    def finish(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        primary = m.labels(self.model_of(0))
        m.requests.labels(primary, self.endpoint, outcome.value).inc()
        for label, n in self.prompts.values():
            m.prompt_tokens.labels(label).inc(n)
        for clock in self.choices.values():
            m.generation_tokens.labels(clock.model).inc(clock.tokens)
        if outcome is Outcome.SUCCESS:
            m.e2e.labels(primary).observe(time.perf_counter() - self.start)

