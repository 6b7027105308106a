"""A connection that cannot work says why, with the likely fix, and says it soon:
TLS to a plaintext port, plaintext to a TLS port, a port nothing listens on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from oco_adapter_irc import IrcAdapter

from oco_core.testing import RecordingHost, free_port


async def first_failure(adapter: IrcAdapter, caplog: pytest.LogCaptureFixture, *, within: float) -> str:
    """The adapter's first 'connection failed' line, which must come within ``within`` s."""
    caplog.set_level(logging.INFO, logger="oco_adapter_irc")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adapter.run, RecordingHost("irc"))
        with trio.fail_after(within):
            while not (lines := [r for r in caplog.records if "IRC connection to" in r.getMessage()]):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert lines[0].exc_info is None
    return lines[0].getMessage()


async def test_tls_to_a_plaintext_port_says_set_tls_false(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    adapter = IrcAdapter(kit.config(tls=True, connect_timeout=60, tls_handshake_timeout=1))
    line = await first_failure(adapter, caplog, within=5)
    where = f"127.0.0.1:{kit.server.port}"
    assert f"TLS handshake with {where} failed" in line
    assert "if this is a plaintext port, set tls: false" in line


async def test_plaintext_to_a_tls_port_says_set_tls_true(
    kit: Any, make_ngircd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trustme = pytest.importorskip("trustme")
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    server = await make_ngircd(tls_cert=(cert, key))
    adapter = IrcAdapter(kit.config(server.tls_port, tls=False, connect_timeout=60))
    line = await first_failure(adapter, caplog, within=5)
    assert f"127.0.0.1:{server.tls_port}" in line
    assert "if this is a TLS port, set tls: true" in line


async def test_a_closed_port_says_refused(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    adapter = IrcAdapter(kit.config(port))
    line = await first_failure(adapter, caplog, within=5)
    assert f"connection to 127.0.0.1:{port} refused — is the IRC server running, and is the port right?" in line


async def test_tls_to_a_server_that_speaks_first_fails_at_once(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def greet(stream: trio.SocketStream) -> None:
        # Many IRC servers say hello before the client says anything.
        with trio.move_on_after(5):
            await stream.send_all(b":irc.example NOTICE * :*** Looking up your hostname...\r\n")
            await stream.receive_some(65536)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, greet, listeners)
        # The handshake timeout is long: the failure must come from the server's line.
        adapter = IrcAdapter(kit.config(port, tls=True, tls_handshake_timeout=30))
        line = await first_failure(adapter, caplog, within=5)
        nursery.cancel_scope.cancel()
    assert f"TLS handshake with 127.0.0.1:{port} failed (" in line
    assert "if this is a plaintext port, set tls: false" in line


async def test_a_host_that_does_not_resolve_says_dns(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    # .invalid never resolves (RFC 6761), and resolvers answer so without asking anyone.
    adapter = IrcAdapter(kit.config(host="irc.example.invalid"))
    line = await first_failure(adapter, caplog, within=10)
    assert "cannot resolve irc.example.invalid (DNS: " in line
    assert "is the host right?" in line
