"""Profile one worker pool with py-spy on a prefilled queue and print where its CPU goes.

    .venv/bin/python scripts/profile_pool.py --pool asyncio -c 1000 --jobs 5000 --latency-ms 100

Needs ``pip install py-spy`` and LOOPLINE_BROKER_URL (or ``loopline redis up``). Prints the functions
with the largest inclusive share of samples; the raw profile is kept for flame graphs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

__all__ = ["main", "summarize"]


def summarize(raw: Path, top: int) -> list[tuple[float, str]]:
    """Inclusive share of samples per function (name and file) from py-spy's raw (collapsed) output."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = {frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0] for frame in stack.split(";")}
        for frame in frames:
            inclusive[frame] += int(count)
    return [(100 * n / total, name) for name, n in inclusive.most_common(top)] if total else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="asyncio")
    parser.add_argument("-c", "--concurrency", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--duration-s", type=int, default=8)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (py-spy --gil): the shares are then of CPU time")
    parser.add_argument("--task-log", action="store_true", help="keep Celery's INFO line per job, as `loopline bench`")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loopline-profile.txt")
    args = parser.parse_args()
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    os.environ.setdefault("LOOPLINE_URL_ALLOWLIST", "127.0.0.1")
    # The reference pipeline (tasks/, config/) sits at the repository root, which `python scripts/...` leaves off
    # sys.path; the worker it starts runs from the root too.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import tasks
    from config.celery_app import app
    from loopline.bench.procs import start_target, start_worker
    from loopline.bench.runner import Workload, _fill

    target, url = start_target(args.latency_ms)
    queue = f"profile.{os.getpid()}"
    try:
        _fill(app, tasks.fetch_url, Workload("fetch_url", args.jobs, args.latency_ms, url), queue)
        worker = start_worker(args.pool, args.concurrency, queues=[queue],
                              log_path=Path(tempfile.gettempdir()) / "loopline-profile-worker.log",
                              env={"LOOPLINE_TASK_LOG": "1" if args.task_log else "0"})
        try:
            time.sleep(3)
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            subprocess.run([py_spy, "record", "-p", str(worker.pid), "-d", str(args.duration_s), "-f", "raw",
                            "-o", str(args.out), "--nonblocking", "--subprocesses", "-r", str(args.rate),
                            *(["--gil"] if args.gil else [])], check=True)
        finally:
            worker.stop()
    finally:
        target.stop()
    for share, name in summarize(args.out, args.top):
        print(f"{share:5.1f}%  {name}")
    print(f"raw profile: {args.out}")


if __name__ == "__main__":
    main()
