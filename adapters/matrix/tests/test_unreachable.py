"""A homeserver that cannot be reached costs one WARNING line a retry, naming the
homeserver, the cause (refused, DNS, TLS, the wrong scheme for the port) and the wait,
never a traceback; and the adapter connects once the homeserver is there."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from oco_adapter_matrix import MatrixAdapter, MatrixConfig

from oco_core.testing import RecordingHost, free_port, run_oco

FAST = {"initial_delay": 0.1, "max_delay": 0.4}


def options(homeserver: str, tmp_path: Path) -> dict[str, object]:
    return {
        "homeserver": homeserver,
        "user_id": "@oco:localhost",
        "password": "not-used",
        "store_path": str(tmp_path / "keys"),
        "reconnect": FAST,
    }


async def test_a_closed_port_is_one_line_a_retry_in_the_bots_log(tmp_path: Path) -> None:
    homeserver = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = {
        "adapters": [{"type": "matrix", **options(homeserver, tmp_path)}],
        "store": {"url": f"sqlite:///{tmp_path / 'oco.db'}"},
        "grpc": {"listen": "127.0.0.1:0"},
    }
    async with run_oco(json.dumps(config), tmp_path / "bot") as oco:
        retry = r"WARNING oco_adapter_matrix\S*: matrix: cannot connect: "
        await oco.expect(retry, stream="stderr", count=8, timeout=20)
    log = oco.stderr_lines
    retries = [line for line in log if re.search(retry, line)]
    for line in retries:
        assert homeserver in line
        assert "connection refused (is the homeserver running, and is the port right?)" in line
        assert re.search(r"; retrying in \d+\.\d s$", line), line
    # Nothing else about the adapter: no traceback, no ERROR, no second line a retry.
    assert not [line for line in log if "Traceback" in line or line.startswith((" ", "\t")) or " ERROR " in line]
    assert not [line for line in log if "adapter 'matrix'" in line and "still connecting" not in line]
    # The waits grow from initial_delay and stop at max_delay.
    delays = [float(m.group(1)) for line in retries if (m := re.search(r"retrying in (\d+\.\d) s", line))]
    assert delays[0] <= 0.1
    assert max(delays) <= 0.4


async def listen_with(nursery: trio.Nursery, handle: Callable[[trio.SocketStream], Awaitable[None]]) -> str:
    """A real TCP listener on a free port that handles every connection with ``handle``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"127.0.0.1:{port}"


async def answers_plain_http(stream: trio.SocketStream) -> None:
    with trio.move_on_after(5):
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await stream.aclose()


async def closes_without_answering(stream: trio.SocketStream) -> None:
    with trio.move_on_after(5):
        await stream.receive_some(65536)
    await stream.aclose()


async def first_retry(homeserver: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """The adapter's first retry line against ``homeserver``; it must still be retrying."""
    adapter = MatrixAdapter(MatrixConfig.model_validate(options(homeserver, tmp_path)))
    caplog.set_level(logging.WARNING, logger="oco_adapter_matrix")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adapter.run, RecordingHost("matrix"))
        with trio.fail_after(15):
            while not [r for r in caplog.records if "retrying in" in r.getMessage()]:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    records = [r for r in caplog.records if r.name.startswith("oco_adapter_matrix")]
    assert all(r.exc_info is None for r in records), "a traceback was logged"
    return records[0].getMessage()


async def test_https_to_a_plain_http_port_says_use_http(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        address = await listen_with(nursery, answers_plain_http)
        line = await first_retry(f"https://{address}", tmp_path, caplog)
        nursery.cancel_scope.cancel()
    assert f"homeserver https://{address}: TLS handshake failed" in line
    assert "if the homeserver serves plain HTTP on this port, use http:// in homeserver" in line


async def test_http_to_a_port_that_does_not_answer_http_says_use_https(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        address = await listen_with(nursery, closes_without_answering)
        line = await first_retry(f"http://{address}", tmp_path, caplog)
        nursery.cancel_scope.cancel()
    assert f"homeserver http://{address}: the server did not answer in HTTP" in line
    assert "if it serves HTTPS on this port, use https:// in homeserver" in line


async def test_a_name_that_does_not_resolve_says_dns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # .invalid never resolves (RFC 6761), and resolvers answer so without asking anyone.
    line = await first_retry("http://matrix.example.invalid", tmp_path, caplog)
    assert "cannot resolve matrix.example.invalid (DNS: " in line


async def refuses_every_login(stream: trio.SocketStream) -> None:
    body = b'{"errcode": "M_FORBIDDEN", "error": "Invalid username or password"}'
    with trio.move_on_after(5):
        await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    await stream.aclose()


async def test_a_refused_login_is_one_error_line_without_traceback(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        address = await listen_with(nursery, refuses_every_login)
        config = {
            "adapters": [{"type": "matrix", **options(f"http://{address}", tmp_path)}],
            "store": {"url": f"sqlite:///{tmp_path / 'oco.db'}"},
            "grpc": {"listen": "127.0.0.1:0"},
        }
        async with run_oco(json.dumps(config), tmp_path / "bot") as oco:
            await oco.expect(r"restarting adapter 'matrix'", stream="stderr", timeout=20)
        nursery.cancel_scope.cancel()
    failed = [line for line in oco.stderr_lines if "adapter 'matrix' failed" in line]
    assert failed
    assert "login as @oco:localhost failed: Invalid username or password" in failed[0]
    assert not [line for line in oco.stderr_lines if "Traceback" in line or line.startswith((" ", "\t"))]
