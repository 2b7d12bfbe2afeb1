"""Prometheus metrics: per-thread latency histograms the hot paths fill without a lock
(``histogram``), and the collectors that turn a node's or the coordinator's counters into
metric families when ``GET /metrics`` is scraped (``node``, ``coordinator``)."""
