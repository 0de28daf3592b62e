"""What a benchmark asks of a pool (``Workload``) and what it measured, job by job (``PoolResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobTimes", "PoolResult", "Workload", "percentile", "timeline"]

TIMELINE_POINTS = 120


@dataclass(frozen=True)
class Workload:
    """What every pool is asked to do: ``jobs`` calls of ``task`` against the target at ``target_url``."""

    task: str
    jobs: int
    latency_ms: float
    target_url: str
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    payload_bytes: int = 256
    #: jobs go round-robin to this many hosts, 127.0.0.1 ... 127.0.0.N (the target listens on each)
    hosts: int = 1
    #: a per-host rule (N/s, N/m, N/h) for every host but 127.0.0.1 while the bench runs; None: no rules
    host_rate: str | None = None

    def _base_url(self, index: int) -> str:
        if self.hosts == 1:
            return self.target_url
        return self.target_url.replace("://127.0.0.1:", f"://127.0.0.{index % self.hosts + 1}:", 1)

    def call(self, index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.task == "io_sleep":
            return (self.latency_ms,), {}
        if self.task == "deliver_webhook":
            return (f"{self._base_url(index)}/job", {"n": index}), {}
        return (f"{self._base_url(index)}/job",), {}

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task": self.task, "jobs": self.jobs, "latency_ms": self.latency_ms,
                                "jitter_ms": self.jitter_ms, "error_rate": self.error_rate,
                                "payload_bytes": self.payload_bytes}
        if self.hosts > 1:
            data.update(hosts=self.hosts, host_rate=self.host_rate)
        return data


@dataclass(frozen=True)
class JobTimes:
    """One finished job: epoch seconds; ``started`` is None for a task that failed (its result has no times)."""

    enqueued: float
    started: float | None
    finished: float
    error: str | None = None
    retries: int = 0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def timeline(finished_s: list[float], points: int = TIMELINE_POINTS) -> list[dict[str, float]]:
    """Completed jobs over time: ``points`` evenly spaced samples of the running count, from 0 to the last finish."""
    if not finished_s:
        return []
    ordered = sorted(finished_s)
    end = max(ordered[-1], 1e-9)
    count = sum(1 for t in ordered if t <= 0)
    out: list[dict[str, float]] = [{"t_s": 0.0, "completed": count}]
    for step in range(1, points + 1):
        t = end * step / points
        while count < len(ordered) and ordered[count] <= t:
            count += 1
        out.append({"t_s": round(t, 4), "completed": count})
    return out


@dataclass
class PoolResult:
    """One pool's run (one repeat), as measured; the derived numbers are properties."""

    pool: str
    concurrency: int
    processes: int = 1
    repeat: int = 1
    total: int = 0
    jobs: list[JobTimes] = field(default_factory=list)
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0

    def add(self, job: JobTimes) -> None:
        self.jobs.append(job)

    @property
    def jobs_ok(self) -> int:
        return sum(1 for j in self.jobs if j.error is None)

    @property
    def jobs_failed(self) -> int:
        return len(self.jobs) - self.jobs_ok

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for j in self.jobs:
            if j.error is not None:
                counts[j.error] = counts.get(j.error, 0) + 1
        return counts

    @property
    def retries(self) -> int:
        return sum(j.retries for j in self.jobs)

    @property
    def t0(self) -> float:
        """When the first job started (epoch seconds): the start of the measured window."""
        starts = [j.started for j in self.jobs if j.started is not None]
        return min(starts) if starts else min((j.finished for j in self.jobs), default=0.0)

    @property
    def wall_s(self) -> float:
        """From the first job started to the last job finished."""
        return max(j.finished for j in self.jobs) - self.t0 if self.jobs else 0.0

    @property
    def throughput_per_s(self) -> float:
        return len(self.jobs) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def slots(self) -> int:
        return self.concurrency * self.processes

    def little_limit_per_s(self, latency_ms: float) -> float:
        """Little's law: at most ``slots`` jobs in flight, each taking ``latency_ms``."""
        return self.slots / (latency_ms / 1000) if latency_ms > 0 else math.inf

    @property
    def latencies_ms(self) -> list[float]:
        """Execution time of each job that reports it: started to finished, queue wait excluded."""
        return [(j.finished - j.started) * 1000 for j in self.jobs if j.started is not None]

    def latency_summary(self) -> dict[str, float]:
        lat = self.latencies_ms
        return {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                "max": max(lat, default=0.0)}

    @property
    def cpu_ms_per_job(self) -> float:
        return self.cpu_s * 1000 / len(self.jobs) if self.jobs else 0.0

    def timeline(self) -> list[dict[str, float]]:
        t0 = self.t0
        return timeline([j.finished - t0 for j in self.jobs])
