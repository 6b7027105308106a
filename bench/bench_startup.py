"""Start-up time of the ``oco`` command, beside Python's own.

    python bench/bench_startup.py [--runs N] [--quick]

Runs, interleaved so that a change in the machine's load touches every row alike:
``python -c pass``, ``python -c "import oco_core"``, ``oco --version``, ``oco --help``,
and ``oco run`` until the bot answers ``oco ping`` with ``PONG`` on standard output
(the shell adapter with piped input, the SQLite store, the bundled ping callback
launched as a subprocess: the defaults, but gRPC on a free port so that a bot already
on 50051 does not matter). Prints the median and the spread (min-max) of each, and the
load average before and after: on a busy machine the figures are not comparable with
an idle one's.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PYTHON = sys.executable
#: The console script pip installed beside this Python (what a user types), else ``python -m oco_core``.
OCO = [str(Path(PYTHON).with_name("oco"))] if Path(PYTHON).with_name("oco").exists() else [PYTHON, "-m", "oco_core"]
#: Longest wait for PONG before the run counts as failed.
PONG_TIMEOUT = 120.0


def timed_command(command: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``command`` until it exits (successfully)."""
    began = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - began


def first_pong(config: Path, env: dict[str, str], log: Path) -> float:
    """Seconds from starting ``oco run`` with ``oco ping`` piped in until PONG is printed."""
    with log.open("wb") as stderr:
        began = time.perf_counter()
        process = subprocess.Popen(
            [*OCO, "run", "--config", str(config)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(b"oco ping\n")
        process.stdin.close()  # as `printf 'oco ping\n' | oco run`: the bot ends after answering
        elapsed = None
        seen = b""
        deadline = time.monotonic() + PONG_TIMEOUT
        while elapsed is None and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                break  # its output ended (or the time is up) without PONG
            seen += chunk
            if b"PONG" in seen:
                elapsed = time.perf_counter() - began
        process.stdout.close()
        try:
            process.wait(timeout=PONG_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if elapsed is None:
        raise SystemExit(f"oco run printed no PONG; its log:\n{log.read_text(errors='replace')[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 runs, for a smoke run")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    work = Path(tempfile.mkdtemp(prefix="oco-bench-startup-"))
    try:
        env = {k: v for k, v in os.environ.items() if k != "OCO_CONFIG"}
        env["XDG_DATA_HOME"] = str(work / "data")  # the SQLite file; made by the warm-up run
        config = work / "oco.yaml"
        config.write_text('grpc: {listen: "127.0.0.1:0"}\n')
        cases: list[tuple[str, Callable[[], float]]] = [
            ("python -c pass", lambda: timed_command([PYTHON, "-c", "pass"], env)),
            ('python -c "import oco_core"', lambda: timed_command([PYTHON, "-c", "import oco_core"], env)),
            ("oco --version", lambda: timed_command([*OCO, "--version"], env)),
            ("oco --help", lambda: timed_command([*OCO, "--help"], env)),
            ("oco run: first PONG", lambda: first_pong(config, env, work / "oco.log")),
        ]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"oco: {' '.join(OCO)}")
        before = os.getloadavg()
        for _, run in cases:  # warm-up, not counted: bytecode caches, the page cache, the SQLite schema
            run()
        times: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(runs):
            for name, run in cases:
                times[name].append(run())
        after = os.getloadavg()
        print(
            f"{runs} runs each, interleaved; load average (1, 5, 15 min) before {_load(before)}, after {_load(after)}"
        )
        print(f"{'':<30} {'median':>9} {'min':>9} {'max':>9}")
        for name, values in times.items():
            print(f"{name:<30} {statistics.median(values):8.3f}s {min(values):8.3f}s {max(values):8.3f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
