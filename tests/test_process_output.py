"""Reading a process's output line by line (the supervisor's log forwarding and
oco_core.testing.Lines share one reader), and oco_core.testing.free_port."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from oco_core._supervisor import read_lines
from oco_core.testing import Lines, free_port


async def lines_of(*chunks: bytes, max_line: int = 65536) -> list[str]:
    """What read_lines hands over for output that arrives in ``chunks``."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_lines, receive, seen.append, max_line)
        for chunk in chunks:
            await send.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        await send.aclose()
    return seen


async def test_lines_are_whole_whatever_the_chunks() -> None:
    assert await lines_of(b"one\ntw", b"o\r\nthr", b"ee\n\nfour") == ["one", "two", "three", "", "four"]


async def test_bad_utf8_is_replaced_and_an_endless_line_comes_in_pieces() -> None:
    assert await lines_of(b"caf\xe9\n") == ["caf\ufffd"]
    # What is held back waiting for its end never grows past max_line; a line that
    # ends within the chunk at hand comes whole.
    assert await lines_of(b"x" * 10, b"y" * 5 + b"\n", max_line=4) == ["xxxx", "xxxx", "xxyyyyy"]


async def test_lines_waits_for_the_count_th_match_and_fails_naming_what_it_saw() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time\nfor i in range(3): print('tick', i, flush=True); time.sleep(0.05)"],
        stdout=subprocess.PIPE,
    )
    output = Lines("the ticker's stdout")
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        nursery.start_soon(output.pump, process.stdout)
        third = await output.wait_for(r"^tick (\d)$", count=3, timeout=30)
        assert third.group(1) == "2"
        # The stream ends with the process: waiting for more fails at once, not after the timeout.
        with (
            trio.fail_after(10),
            pytest.raises(AssertionError, match=r"the ticker's stdout: 1 line\(s\) matching 'tock'"),
        ):
            await output.wait_for("tock", timeout=60)
        assert output.ended
    assert [m.group(0) for m in output.matches("tick")] == ["tick", "tick", "tick"]
    assert await process.wait() == 0


def test_free_port_is_free_to_listen_on() -> None:
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
