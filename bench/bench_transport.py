"""Transport benchmark (issue 17): OCO's gRPC path beside a bare grpc.aio round trip.

    python bench/bench_transport.py [--quick] [--rounds N] [--before COMMIT] [--markdown]

Everything runs on this machine, the cases of each round one after the other. Printed,
each figure the median of the rounds with (min-max):

1. the floor: a bare grpc.aio unary and bidi-stream round trip with OCO's messages (an
   ``oco.Event`` in, a ``SendMessagesRequest`` out; ``_transport_floor.py``), one at a
   time (p50, p99, /s) and with 64 in flight (/s);
2. a chat command answered by a callback ("oco ping <n>" injected into the memory
   adapter of a bot that runs in the driving process, ``_transport_chat.py``; "pong <n>"
   awaited) with an SDK callback (``oco_core.Callback``), with raw stubs generated from
   the specification's two files (Listen, one unary SendMessages a reply;
   ``_transport_spec.py``) and with raw stubs over ListenBatches and SendMessageBatches
   (when the build has them); one at a time and with 64 in flight, at 1 route and at
   1,000 (999 that never match). A reply whose n was not sent, or was answered already,
   is wrong: wrong replies are printed and the run exits 1;
3. events a second pushed to one Listen (and ListenBatches) stream: the bot queues them
   all, then a client process reads them as fast as the stream brings them;
4. the bot's peak RSS (an ``oco run`` process, bench_memory's reading) with 1,000 SDK
   callbacks connected;
5. the issue's targets beside the figures, met or not.

``--before COMMIT`` (by default the last commit before issue 17's transport work; not
with --quick unless given; ``none``: skip): the chat and stream cases again, in the same
rounds, with oco_core as it was at COMMIT (``git archive`` into a temporary folder, first
on PYTHONPATH for the bot and its callbacks), so that "no slower than before" is judged
side by side. ``--quick``: one round, fewer messages (a smoke run of about a minute). ``--markdown``
also prints the tables as Markdown, for the README. How long each case took goes to
stderr.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio
from _transport_common import NOT_IN_BUILD, CaseError, Child
from bench_memory import peak_rss_mb

import oco_core
from oco_core.testing import run_oco

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = ROOT / "tests" / "spec_proto"
SECRET = "bench-transport-secret-0123456789"
WINDOW = 64
ROUTE_COUNTS = (1, 1000)
RSS_CALLBACKS = 1000
RSS_PROCESSES = 8  # each SDK callback has its own bridge thread: spread out, they connect sooner

#: The issue's targets.
TARGET_P50_RATIO = 1.5
TARGET_IN_FLIGHT = 10_000
TARGET_PUSHED = 30_000
TARGET_RSS_MB = 300
#: "A spec-only client must not get slower": now against --before, round by round, with
#: this much room for the noise of a shared machine.
NO_SLOWER_MARGIN = 0.10
#: The last commit before issue 17 changed the transport: --before's default.
BEFORE_ISSUE_17 = "b998eb0"


@dataclass(frozen=True)
class Sizes:
    sequential: int  # one-at-a-time round trips measured (after 100 to warm up)
    in_flight: int  # messages sent with WINDOW in flight
    floor_sequential: int
    floor_in_flight: int
    events: int  # events pushed to one stream


FULL = Sizes(sequential=800, in_flight=4000, floor_sequential=2000, floor_in_flight=8000, events=30000)
QUICK = Sizes(sequential=200, in_flight=1500, floor_sequential=500, floor_in_flight=2000, events=8000)

KINDS = {
    "sdk": "SDK callback",
    "spec": "spec-only stubs: Listen + SendMessages",
    "batched": "raw stubs: ListenBatches + SendMessageBatches",
}
STREAMS = {"listen": "Listen", "batches": "ListenBatches"}


# -- the cases ------------------------------------------------------------------------


async def floor(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The unary and the stream method's figures and wrong answers."""
    server = await Child.start("the floor's server", "_transport_floor.py", "server")
    try:
        port = (await server.line()).removeprefix("ready ")
        args = (f"127.0.0.1:{port}", str(sizes.floor_sequential), str(sizes.floor_in_flight), str(WINDOW))
        client = await Child.start("the floor's client", "_transport_floor.py", "client", *args)
        try:
            result: dict[str, dict[str, Any]] = json.loads(await client.line(timeout=300))
        finally:
            await client.stop()
    finally:
        await server.stop()
    return result


async def through_bot(name: str, before: Path | None, *args: str) -> dict[str, Any]:
    """A case of _transport_chat.py (with oco_core from ``before`` when given)."""
    env = (
        {"PYTHONPATH": os.pathsep.join(filter(None, [str(before), os.environ.get("PYTHONPATH", "")]))} if before else {}
    )
    child = await Child.start(name, "_transport_chat.py", *args, env=env)
    try:
        result: dict[str, Any] = json.loads(await child.line(timeout=300))
    finally:
        await child.stop()
    if "error" in result:
        raise CaseError(result["error"])
    return result


async def memory(tmp: Path) -> tuple[float, float]:
    """The bot's peak RSS (MB) idle, then with RSS_CALLBACKS SDK callbacks connected."""
    callbacks = "\n".join(f'  - {{id: rss{i}, secret: "{SECRET}{i}"}}' for i in range(RSS_CALLBACKS))
    config = f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0", max_connections: {RSS_CALLBACKS * 2}}}
log_level: ERROR
callbacks:
{callbacks}
"""
    async with run_oco(config, tmp / f"rss-{time.monotonic_ns()}") as bot:
        idle = peak_rss_mb(bot.process.pid)
        each = RSS_CALLBACKS // RSS_PROCESSES
        children = []
        try:
            for first in range(0, RSS_CALLBACKS, each):
                args = (bot.address, str(first), str(each), SECRET)
                name = f"SDK callbacks from rss{first}"
                children.append(await Child.start(name, "_transport_clients.py", "sdk-many", *args))
            for child in children:
                if (line := await child.line(timeout=300)) != "ready":
                    raise CaseError(f"{child.name} said {line!r}")
            connected = peak_rss_mb(bot.process.pid)
        finally:
            for child in children:
                await child.stop()
    return idle, connected


# -- what a run collects, and how it is printed ---------------------------------------


@dataclass
class Row:
    """One case over the rounds: its figures, its wrong replies, or why it has none."""

    label: str
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    in_flight: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    missing: str = ""

    def add(self, figures: dict[str, Any]) -> None:
        self.wrong += figures.get("wrong", [])
        if "missing" in figures:
            self.missing = figures["missing"]
            return
        self.p50.append(figures["p50"])
        self.p99.append(figures["p99"])
        self.rate.append(figures["rate"])
        self.in_flight.append(figures["in_flight"])


@dataclass
class Stream:
    """Events pushed to one stream, over the rounds."""

    label: str
    taken: list[float] = field(default_factory=list)  # events/s the stream took
    routed: list[float] = field(default_factory=list)  # events/s routed into its queue
    missing: str = ""

    def add(self, figures: dict[str, Any]) -> None:
        if "missing" in figures:
            self.missing = figures["missing"]
            return
        self.taken.append(figures["taken"])
        self.routed.append(figures["routed"])


@dataclass
class Run:
    before: str  # the commit of --before, or ""
    floor: dict[str, Row] = field(default_factory=dict)
    chat: dict[tuple[str, int, str], Row] = field(default_factory=dict)  # kind, routes, "now" or "before"
    pushed: dict[tuple[str, str], Stream] = field(default_factory=dict)  # how, "now" or "before"
    rss: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.floor = {"unary": Row("bare grpc.aio unary (the floor)"), "stream": Row("bare grpc.aio bidi stream")}
        for when in self.builds:
            prefix = "OCO" if when == "now" else f"before ({self.before})"
            for routes in ROUTE_COUNTS:
                for kind, label in KINDS.items():
                    self.chat[kind, routes, when] = Row(f"{prefix}, {label}")
            for how, label in STREAMS.items():
                self.pushed[how, when] = Stream(f"{label}{'' if when == 'now' else f', before ({self.before})'}")

    @property
    def builds(self) -> list[str]:
        return ["now", "before"] if self.before else ["now"]


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    """The median, and (min-max) when there are several rounds."""
    if not values:
        return "-"
    median = f"{statistics.median(values) * scale:,.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values) * scale:,.{digits}f}-{max(values) * scale:,.{digits}f})"


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [headers, *rows]
    ]


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def ratios(values: list[float], bases: list[float]) -> list[float]:
    """Round by round: each figure over the one measured beside it."""
    return [value / base for value, base in zip(values, bases, strict=False)]


def report(run: Run, markdown: bool) -> list[str]:
    out = [f"Round trips: one at a time (p50, p99, round trips/s), then {WINDOW} in flight (replies/s)"]
    headers = ["case", "routes", "p50 ms", "p99 ms", "one at a time /s", f"{WINDOW} in flight /s", "wrong"]
    labelled = [("-", row) for row in run.floor.values()]
    for routes in ROUTE_COUNTS:
        for kind in KINDS:
            for when in run.builds:
                row = run.chat[kind, routes, when]
                if not (when == "before" and row.missing == NOT_IN_BUILD):
                    labelled.append((f"{routes:,}", row))
    rows = []
    for routes_cell, row in labelled:
        if not row.p50:
            rows.append([row.label, routes_cell, row.missing or "failed", "", "", "", ""])
            continue
        figures = [spread(row.p50, 1e3, 2), spread(row.p99, 1e3, 2), spread(row.rate), spread(row.in_flight)]
        rows.append([row.label, routes_cell, *figures, str(len(row.wrong))])
    out += table(headers, rows, markdown)

    out += ["", "Events pushed to one stream: all queued in the bot, then read as fast as they come"]
    rows = []
    for stream in run.pushed.values():
        if stream.taken:
            rows.append([stream.label, spread(stream.taken), spread(stream.routed)])
        elif stream.missing != NOT_IN_BUILD or stream.label in STREAMS.values():
            rows.append([stream.label, stream.missing or "failed", ""])
    out += table(["stream", "events/s", "(routed into the queue /s)"], rows, markdown)
    if run.rss:
        idle, connected = spread([r[0] for r in run.rss]), spread([r[1] for r in run.rss])
        out += ["", f"Bot peak RSS (oco run): idle {idle} MB; {RSS_CALLBACKS:,} SDK callbacks connected {connected} MB"]
    return out


def targets(run: Run) -> list[str]:
    out = ["Targets (issue 17), from figures of the same rounds"]
    unary = run.floor["unary"]
    for routes in ROUTE_COUNTS:
        sdk, spec = run.chat["sdk", routes, "now"], run.chat["spec", routes, "now"]
        at = f"{routes:,} route{'s' if routes > 1 else ''}"
        if sdk.p50 and unary.p50:
            ratio = ratios(sdk.p50, unary.p50)
            met = statistics.median(ratio) <= TARGET_P50_RATIO
            out.append(
                f"  SDK p50 / bare unary p50, {at}: {spread(ratio, digits=2)} (≤ {TARGET_P50_RATIO}) {verdict(met)}"
            )
        if sdk.in_flight:
            met = statistics.median(sdk.in_flight) >= TARGET_IN_FLIGHT and not sdk.wrong
            figure = f"{spread(sdk.in_flight)}/s, {len(sdk.wrong)} wrong"
            out.append(f"  SDK {WINDOW} in flight, {at}: {figure} (≥ {TARGET_IN_FLIGHT:,}/s, 0 wrong) {verdict(met)}")
        if not spec.p50:
            continue
        old = run.chat["spec", routes, "before"] if run.before else None
        if old is None or not old.p50:
            out.append(f"  spec-only client, {at}: no slower than before: run with --before COMMIT to judge")
            continue
        p50, flight = ratios(spec.p50, old.p50), ratios(spec.in_flight, old.in_flight)
        met = statistics.median(p50) <= 1 + NO_SLOWER_MARGIN and statistics.median(flight) >= 1 - NO_SLOWER_MARGIN
        out.append(
            f"  spec-only client, {at}, now / before: p50 {spread(p50, digits=2)}, {WINDOW} in flight "
            f"{spread(flight, digits=2)} (no slower, within {NO_SLOWER_MARGIN:.0%}) {verdict(met)}"
        )
    for how, label in STREAMS.items():
        stream = run.pushed[how, "now"]
        if stream.taken:
            rate = statistics.median(stream.taken)
            met = verdict(rate >= TARGET_PUSHED)
            out.append(f"  events pushed, {label}: {rate:,.0f}/s (≥ {TARGET_PUSHED:,}/s) {met}")
    if run.rss:
        peak = statistics.median(r[1] for r in run.rss)
        met = verdict(peak < TARGET_RSS_MB)
        out.append(f"  bot RSS with {RSS_CALLBACKS:,} SDK callbacks: {peak:,.0f} MB (< {TARGET_RSS_MB} MB) {met}")
    return out


# -- the run --------------------------------------------------------------------------


def header() -> list[str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    source = Path(oco_core.__file__).resolve().parent.parent
    git = ["git", "-C", str(source)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--", "oco_core", "proto"], capture_output=True, text=True)
    version = f"{commit or 'unknown'}{' with uncommitted changes to oco_core/proto' if changed.stdout.strip() else ''}"
    return [
        f"OCO transport benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}, {source} at {version}",
        f"machine: {os.cpu_count()} cores, {model}, {platform.machine()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}",
    ]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def generate_spec_stubs(out: Path) -> Path:
    """Python modules from the specification's two files alone (as tests/test_spec_client.py)."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit(
            "bench_transport needs grpcio-tools for the spec-only client: pip install grpcio-tools"
        ) from None
    out.mkdir()
    include = Path(protoc.__file__).parent / "_proto"
    args = [f"-I{include}", f"-I{SPEC}", f"--python_out={out}", f"--grpc_python_out={out}", "core.proto", "robot.proto"]
    if (code := protoc.main(["protoc", *args])) != 0:
        raise SystemExit(f"protoc failed ({code}) on {SPEC}")
    return out


def checkout(commit: str, out: Path) -> Path:
    """oco_core as it was at ``commit``, unpacked into ``out`` (git archive: the
    repository is only read)."""
    archived = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "oco_core"], capture_output=True)
    if archived.returncode != 0:
        raise SystemExit(
            f"--before {commit}: git archive failed ({archived.stderr.decode().strip()}); "
            "give a commit of this repository, or --before none"
        )
    with tarfile.open(fileobj=io.BytesIO(archived.stdout)) as archive:
        archive.extractall(out, filter="data")
    return out


@contextmanager
def timed(label: str) -> Iterator[None]:
    """Tell stderr how long the block took (to keep the run's length in view)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        print(f"  {label}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)


async def one_round(run: Run, sizes: Sizes, tmp: Path, stubs: Path, before: Path | None) -> None:
    try:
        with timed("floor"):
            measured = await floor(sizes)
    except CaseError as exc:
        run.failures.append(f"floor: {exc}")
    else:
        for kind, row in run.floor.items():
            row.add(measured[kind])
    sizes_args = (str(sizes.sequential), str(sizes.in_flight), str(WINDOW), str(stubs))
    for routes in ROUTE_COUNTS:
        for kind in KINDS:
            for when in run.builds:
                row = run.chat[kind, routes, when]
                args = ("chat", kind, str(routes), *sizes_args)
                try:
                    with timed(f"{kind}, {routes} route(s), {when}"):
                        row.add(await through_bot(row.label, before if when == "before" else None, *args))
                except CaseError as exc:
                    run.failures.append(f"{row.label}, {routes} route(s): {exc}")
    for how in STREAMS:
        for when in run.builds:
            stream = run.pushed[how, when]
            try:
                with timed(f"events pushed, {how}, {when}"):
                    args = ("pushed", how, str(sizes.events))
                    stream.add(await through_bot(stream.label, before if when == "before" else None, *args))
            except CaseError as exc:
                run.failures.append(f"events pushed, {stream.label}: {exc}")
    try:
        with timed("memory"):
            run.rss.append(await memory(tmp))
    except CaseError as exc:
        run.failures.append(f"memory: {exc}")


async def main(rounds: int, sizes: Sizes, before: str, markdown: bool) -> int:
    print(*header(), sep="\n")
    if before:
        print(f"before: oco_core at {before}, for the rows that say so")
    print(f"load average at start: {load()}")
    print(
        f"Figures vary between runs and with the machine's load: each is the median of {rounds} round(s), "
        "(min-max) beside it; the cases of a round run one after the other, all on this machine."
    )
    run = Run(before=before)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        stubs = generate_spec_stubs(tmp / "spec_stubs")
        old = checkout(before, tmp / "before") if before else None
        for number in range(1, rounds + 1):
            print(f"round {number} of {rounds}:", file=sys.stderr, flush=True)
            await one_round(run, sizes, tmp, stubs, old)

    print()
    print(*report(run, markdown=False), sep="\n")
    print()
    print(*targets(run), sep="\n")
    if markdown:
        print()
        print(*report(run, markdown=True), sep="\n")
    print()
    print(f"load average at end: {load()} (this run's own count: the memory case starts 1,000 callbacks at once)")
    status = 0
    wrong = [row for row in [*run.floor.values(), *run.chat.values()] if row.wrong]
    if wrong:
        status = 1
        print("WRONG REPLIES:")
        for row in wrong:
            shown = ", ".join(row.wrong[:20]) + (" ..." if len(row.wrong) > 20 else "")
            print(f"  {row.label}: {len(row.wrong)}: {shown}")
    if run.failures:
        status = 1
        print("FAILED:", *run.failures, sep="\n  ")
    return status


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer messages: a smoke run of about a minute")
    parser.add_argument(
        "--rounds", type=int, default=None, help="each figure is the median of N rounds (default 3; --quick 1)"
    )
    parser.add_argument(
        "--before",
        metavar="COMMIT",
        help=f"also measure oco_core as it was at COMMIT (default {BEFORE_ISSUE_17}, none with --quick); 'none': don't",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown too (for the README)")
    options = parser.parse_args()
    rounds = options.rounds or (1 if options.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    before = options.before or ("none" if options.quick else BEFORE_ISSUE_17)
    before = "" if before == "none" else before
    sys.exit(trio.run(main, rounds, QUICK if options.quick else FULL, before, options.markdown))
