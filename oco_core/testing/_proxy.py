"""A TCP proxy in front of a real server (PostgreSQL, Redis) that a test can break in
the two ways networks break, without touching the server itself, which other tests share:

- :meth:`TcpProxy.cut`: connections drop and new ones are closed at once, as when the
  server is down (the client hears about it at once);
- :meth:`TcpProxy.freeze`: connections are accepted and kept, their bytes read, but
  nothing is forwarded either way, as when the server hangs or a firewall drops the
  packets of an established connection. The client's kernel sees every byte it sends
  acknowledged, so only a client-side timeout notices: TCP keepalives and
  ``tcp_user_timeout`` do not fire, and neither does the server's statement timeout
  (the statement never reaches the server).

:meth:`TcpProxy.restore` ends either: held bytes are forwarded on connections that
survived a freeze, as after a network partition heals.
"""

from __future__ import annotations

import trio


class TcpProxy:
    """A TCP proxy to a server that a test can cut off, freeze and restore.

    Run it in a nursery with ``await nursery.start(proxy.run)``; it listens on a free
    loopback port, ``proxy.port``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._cut = False
        self._flowing = trio.Event()
        self._flowing.set()
        self._links: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (``self.port``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @property
    def frozen(self) -> bool:
        """Whether the proxy holds every byte instead of forwarding it."""
        return not self._flowing.is_set()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (accept, then close at once)."""
        self._cut = True
        for link in list(self._links):
            link.cancel()

    def freeze(self) -> None:
        """Keep connections open (and accept new ones) but forward nothing: a server that
        accepts connections and never answers."""
        if not self.frozen:
            self._flowing = trio.Event()

    def restore(self) -> None:
        """Let connections through again (after :meth:`cut` or :meth:`freeze`)."""
        self._cut = False
        self._flowing.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self._cut:
                return
            with trio.CancelScope() as link:
                self._links.add(link)
                try:
                    # A frozen proxy accepts (the kernel already has) but does not reach
                    # the server until restored.
                    await self._flowing.wait()
                    server = await trio.open_tcp_stream(*self.target)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
                except (OSError, trio.BrokenResourceError):
                    pass
                finally:
                    self._links.discard(link)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
        try:
            async for chunk in source:
                # Read while frozen, so the sender's kernel sees its bytes acknowledged
                # and its writes complete, as with a server that hangs.
                await self._flowing.wait()
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()
