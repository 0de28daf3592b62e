"""JSON Schema of the run file ``loopline bench`` writes (``results/<run_id>.json``); the README documents it."""

from __future__ import annotations

from typing import Any

__all__ = ["RUN_SCHEMA"]

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NULLABLE_NUM = {"type": ["number", "null"]}
_LATENCY = {"type": "object", "required": ["p50", "p95", "p99", "max"],
            "properties": {k: _NUM for k in ("p50", "p95", "p99", "max")}}
_TIMELINE = {"type": "array", "items": {"type": "object", "required": ["t_s", "completed"],
                                        "properties": {"t_s": _NUM, "completed": _INT}}}
_ERRORS = {"type": "object", "additionalProperties": _INT}

_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["pool", "concurrency", "processes", "repeat", "jobs_ok", "jobs_failed", "errors", "retries", "wall_s",
                 "throughput_per_s", "little_limit_per_s", "pct_of_limit", "latency_ms", "worker_cpu_s",
                 "worker_cpu_ms_per_job", "peak_rss_mb", "timeline"],
    "properties": {
        "pool": _STR, "concurrency": _INT, "processes": _INT, "repeat": _INT, "jobs_ok": _INT, "jobs_failed": _INT,
        "errors": _ERRORS, "retries": _INT, "wall_s": _NUM, "throughput_per_s": _NUM,
        "little_limit_per_s": _NULLABLE_NUM, "pct_of_limit": _NULLABLE_NUM, "latency_ms": _LATENCY,
        "worker_cpu_s": _NUM, "worker_cpu_ms_per_job": _NUM, "peak_rss_mb": _NUM, "timeline": _TIMELINE,
        "jobs": {
            "type": "object",
            "required": ["t0", "enqueued_s", "started_s", "finished_s", "error"],
            "properties": {
                "t0": _NUM, "enqueued_s": {"type": "array", "items": _NUM},
                "started_s": {"type": "array", "items": _NULLABLE_NUM},
                "finished_s": {"type": "array", "items": _NUM},
                "error": {"type": "array", "items": {"type": ["string", "null"]}},
            },
        },
    },
}

_SUMMARY: dict[str, Any] = {
    "type": "object",
    "required": ["pool", "concurrency", "processes", "repeats", "jobs_ok", "jobs_failed", "errors", "throughput_per_s",
                 "throughput_min_per_s", "throughput_max_per_s", "little_limit_per_s", "pct_of_limit", "latency_ms",
                 "worker_cpu_ms_per_job", "peak_rss_mb", "timeline", "timeline_repeat", "vs_best"],
    "properties": {
        "pool": _STR, "concurrency": _INT, "processes": _INT, "repeats": _INT, "jobs_ok": _INT, "jobs_failed": _INT,
        "errors": _ERRORS, "throughput_per_s": _NUM, "throughput_min_per_s": _NUM, "throughput_max_per_s": _NUM,
        "little_limit_per_s": _NULLABLE_NUM, "pct_of_limit": _NULLABLE_NUM, "latency_ms": _LATENCY,
        "worker_cpu_ms_per_job": _NUM, "peak_rss_mb": _NUM, "timeline": _TIMELINE, "timeline_repeat": _INT,
        "vs_best": _NULLABLE_NUM,
        "vs_stock": {"type": ["object", "null"], "required": ["throughput", "per_cpu"],
                     "properties": {"throughput": _NUM, "per_cpu": _NUM}},
    },
}

# ``--baseline stock``: the same pools on a plain Celery app. Its entries and rows have the fields above, plus
# ``error`` (why that repeat, or the pool's first failed repeat, did not finish; None when it did).
_BASELINE_RESULT: dict[str, Any] = {
    **_RESULT, "required": [*_RESULT["required"], "error"],
    "properties": {**_RESULT["properties"], "error": {"type": ["string", "null"]}},
}
_BASELINE_SUMMARY: dict[str, Any] = {
    **_SUMMARY, "required": [*_SUMMARY["required"], "error", "failed_repeats"],
    "properties": {**_SUMMARY["properties"], "error": {"type": ["string", "null"]},
                   "failed_repeats": _INT},
}
_BASELINE = {
    "type": ["object", "null"],
    "required": ["system", "results", "summary"],
    "properties": {"system": {"enum": ["stock"]}, "results": {"type": "array", "items": _BASELINE_RESULT},
                   "summary": {"type": "array", "items": _BASELINE_SUMMARY}},
}

RUN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "loopline bench run",
    "type": "object",
    "required": ["schema", "run_id", "status", "error", "started_at", "finished_at", "command", "machine",
                 "workload", "results", "summary", "winner", "progress"],
    "properties": {
        "schema": {"const": "loopline.bench/1"},
        "run_id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "status": {"enum": ["running", "complete", "failed", "interrupted"]},
        "error": {"type": ["string", "null"]},
        "started_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "command": _STR,
        "machine": {
            "type": "object",
            "required": ["cpus", "platform", "python", "celery", "kombu", "redis", "redis_py"],
            "properties": {"cpus": {"type": ["integer", "null"]}, "platform": _STR, "python": _STR,
                           "celery": {"type": ["string", "null"]}, "kombu": {"type": ["string", "null"]},
                           "redis": {"type": ["string", "null"]}, "redis_py": {"type": ["string", "null"]}},
        },
        "workload": {
            "type": "object",
            "required": ["task", "jobs", "latency_ms", "jitter_ms", "error_rate", "payload_bytes", "pools", "repeats"],
            "properties": {
                "task": {"enum": ["fetch_url", "io_sleep", "deliver_webhook"]}, "jobs": _INT, "latency_ms": _NUM,
                "jitter_ms": _NUM, "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                "payload_bytes": _INT, "pools": {"type": "array", "items": _STR}, "repeats": _INT,
            },
        },
        "results": {"type": "array", "items": _RESULT},
        "summary": {"type": "array", "items": _SUMMARY},
        "winner": {
            "type": ["object", "null"],
            "required": ["pool", "throughput_per_s"],
            "properties": {"pool": _STR, "throughput_per_s": _NUM, "runner_up": _STR, "ratio": _NUM},
        },
        "baseline": _BASELINE,
        "progress": {
            "type": ["object", "null"],
            "required": ["pool", "repeat", "done", "total", "throughput_per_s", "timeline"],
            "properties": {"pool": _STR, "repeat": _INT, "done": _INT, "total": _INT, "throughput_per_s": _NUM,
                           "timeline": _TIMELINE},
        },
    },
}
