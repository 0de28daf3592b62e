"""``loopline bench --hosts N --host-rate RATE``: jobs spread over loopback host names, checked before a run."""

from __future__ import annotations

import pytest

from loopline.bench.jobs import Workload
from loopline.bench.target import host_addresses
from loopline.cli import build_parser
from loopline.cli.bench import plan_from_args


def test_jobs_go_round_robin_to_each_loopback_host() -> None:
    workload = Workload("fetch_url", 6, 0.0, "http://127.0.0.1:8123", hosts=3, host_rate="5/s")
    urls = [workload.call(n)[0][0] for n in range(6)]
    assert urls == [f"http://127.0.0.{n % 3 + 1}:8123/job" for n in range(6)]
    assert workload.as_dict()["hosts"] == 3 and workload.as_dict()["host_rate"] == "5/s"
    assert "hosts" not in Workload("fetch_url", 6, 0.0, "http://127.0.0.1:8123").as_dict()
    assert host_addresses(3) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


@pytest.mark.parametrize(("argv", "reason"), [
    (["--host-rate", "5/s"], "--host-rate needs --hosts 2 or more"),
    (["--hosts", "3", "--host-rate", "5/d"], "must look like N/s, N/m or N/h"),
    (["--hosts", "0"], "--hosts must be between 1 and 250"),
])
def test_bad_host_options_are_refused_before_anything_starts(argv: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        plan_from_args(build_parser().parse_args(["bench", *argv]))


def test_the_run_command_spells_the_host_options() -> None:
    args = build_parser().parse_args(["bench", "--hosts", "3", "--host-rate", "20/s"])
    assert "--hosts 3 --host-rate 20/s" in plan_from_args(args).command(args)
