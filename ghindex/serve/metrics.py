"""Service metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Updated on the event loop only (request middleware, batch callbacks), so no locks are needed.
"""
from __future__ import annotations

import bisect
from collections import defaultdict

#: Upper bounds (seconds) of the request latency histogram.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (queries) of the search batch size histogram.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, **labels) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            out.append(f"{name}_bucket{_labels(**labels, le=f'{bound:g}')} {cumulative}")
        out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {self.count}")
        out.append(f"{name}_sum{_labels(**labels)} {self.sum:.6f}")
        out.append(f"{name}_count{_labels(**labels)} {self.count}")
        return out


class Metrics:
    """Requests by endpoint, method and status; request latency; queries searched; batches; index size."""

    def __init__(self, index_size: int = 0, bits: int = 0):
        self.index_size, self.bits = int(index_size), int(bits)
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.queries = 0
        self.search_batch = _Histogram(BATCH_BUCKETS)
        self.images = 0
        self.encode_batch = _Histogram(BATCH_BUCKETS)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, method, str(status))] += 1
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = _Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def observe_search_batch(self, requests: int, queries: int) -> None:
        self.queries += queries
        self.search_batch.observe(queries)

    def observe_encode_batch(self, requests: int, images: int) -> None:
        self.images += images
        self.encode_batch.observe(images)

    def render(self) -> str:
        lines = [
            "# HELP ghindex_requests_total HTTP requests answered, by endpoint, method and status.",
            "# TYPE ghindex_requests_total counter",
        ]
        for (endpoint, method, status), n in sorted(self.requests.items()):
            lines.append(f"ghindex_requests_total{_labels(endpoint=endpoint, method=method, status=status)} {n}")
        lines += [
            "# HELP ghindex_request_duration_seconds Time from request to response, by endpoint.",
            "# TYPE ghindex_request_duration_seconds histogram",
        ]
        for endpoint, hist in sorted(self.latency.items()):
            lines += hist.lines("ghindex_request_duration_seconds", endpoint=endpoint)
        lines += [
            "# HELP ghindex_queries_searched_total Query codes searched in the index.",
            "# TYPE ghindex_queries_searched_total counter",
            f"ghindex_queries_searched_total {self.queries}",
            "# HELP ghindex_search_batch_queries Query codes per index search (micro-batch size).",
            "# TYPE ghindex_search_batch_queries histogram",
            *self.search_batch.lines("ghindex_search_batch_queries"),
            "# HELP ghindex_images_encoded_total Uploaded images encoded to codes.",
            "# TYPE ghindex_images_encoded_total counter",
            f"ghindex_images_encoded_total {self.images}",
            "# HELP ghindex_encode_batch_images Images per encoder call (micro-batch size).",
            "# TYPE ghindex_encode_batch_images histogram",
            *self.encode_batch.lines("ghindex_encode_batch_images"),
            "# HELP ghindex_index_codes Codes in the served index.",
            "# TYPE ghindex_index_codes gauge",
            f"ghindex_index_codes {self.index_size}",
            "# HELP ghindex_index_bits Bits per code of the served index.",
            "# TYPE ghindex_index_bits gauge",
            f"ghindex_index_bits {self.bits}",
        ]
        return "\n".join(lines) + "\n"
