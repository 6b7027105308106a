"""Fixtures for the Matrix adapter's tests: a real Synapse, a person, a bot account whose
adapter reports to a :class:`~oco_core.testing.RecordingHost`, and ``live_chat`` for the
adapter contract suite (test_matrix_contract.py).

Synapse comes from PyPI into its own virtual environment (it pins its own dependencies),
created once and kept in ``~/.cache/oco-tests/synapse-venv-<version>`` (or
``$OCO_TEST_CACHE``). Set ``OCO_SYNAPSE_PYTHON`` to the Python of an existing Synapse
install to skip the install.

The person is a second account driven by matrix-nio's own ``AsyncClient``, on an asyncio
loop in a thread of its own, so that the adapter is checked against an independent
client (with its own end-to-end encryption).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nio  # type: ignore[import-untyped]  # nio ships no type information
import pytest
import trio
from oco_adapter_matrix import MatrixAdapter, MatrixConfig

from oco_core.plugin import IncomingMessage, MembershipKind, OutgoingMessage
from oco_core.testing import RecordingHost, free_port
from oco_core.testing.adapter_contract import ChatPerson, LiveChat, SeenByPerson, SeenMessage
from oco_core.testing.pytest_plugin import server_unavailable, server_used


def _thread_local_nio_store_models() -> None:
    """Let two nio clients in two threads of one process keep their crypto stores.

    nio's stores bind peewee's model classes (which are global) to their own database for
    each operation. The bot does that only on trio's thread, but the person's AsyncClient
    runs on a thread of its own, and both at once could see the other's database (or none).
    peewee's ThreadSafeDatabaseMetadata keeps that binding per thread. Tests only: a bot
    process runs nio on one thread.
    """
    from nio.store import models  # type: ignore[import-untyped]
    from peewee import Model  # type: ignore[import-untyped]
    from playhouse.shortcuts import ThreadSafeDatabaseMetadata  # type: ignore[import-untyped]

    for model in vars(models).values():
        if not (isinstance(model, type) and issubclass(model, Model)) or model is Model:
            continue
        meta: Any = getattr(model, "_meta")  # noqa: B009  (peewee is untyped; mypy sees a bare type)
        if isinstance(meta, ThreadSafeDatabaseMetadata):
            continue
        database = meta.database
        meta.__class__ = ThreadSafeDatabaseMetadata
        meta._lock = threading.Lock()
        meta._local = threading.local()
        meta._database = database


_thread_local_nio_store_models()

SYNAPSE_VERSION = "1.163.2"
SHARED_SECRET = "oco-test-shared-secret"
T = TypeVar("T")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Synapse


def _cache_dir() -> Path:
    return Path(os.environ.get("OCO_TEST_CACHE") or Path.home() / ".cache" / "oco-tests")


def synapse_python() -> Path:
    """The Python of a Synapse install, installing it into the cache on first use."""
    given = os.environ.get("OCO_SYNAPSE_PYTHON")
    if given:
        return Path(given)
    venv = _cache_dir() / f"synapse-venv-{SYNAPSE_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".oco-installed"
    if marker.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    # One installer at a time, also across concurrent test sessions (nox + pytest).
    with open(venv.parent / f".synapse-{SYNAPSE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, capture_output=True)
        result = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                f"matrix-synapse=={SYNAPSE_VERSION}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"pip install matrix-synapse failed: {result.stderr[-2000:]}")
        marker.write_text(f"installed in {time.monotonic() - started:.1f} s\n")
    return python


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test run is killed (no fixture teardown),
    # the kernel stops Synapse too instead of leaving it orphaned (Linux only).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Synapse:
    """A Synapse homeserver on a free loopback port, with SQLite and open registration."""

    def __init__(self, python: Path, directory: Path) -> None:
        self.python = python
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server_name = "localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self._write_config()

    def _write_config(self) -> None:
        d = self.directory
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        (d / "signing.key").write_text(f"ed25519 a_oco {seed}\n")
        (d / "log.yaml").write_text(
            "version: 1\n"
            "formatters: {f: {format: '%(asctime)s %(name)s %(levelname)s %(message)s'}}\n"
            "handlers: {file: {class: logging.FileHandler, formatter: f, filename: "
            f"{json.dumps(str(d / 'homeserver.log'))}}}}}\n"
            "root: {level: INFO, handlers: [file]}\n"
            "disable_existing_loggers: false\n"
        )
        lots = {"per_second": 1000, "burst_count": 1000}
        config = {
            "server_name": self.server_name,
            "pid_file": str(d / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(d / "homeserver.db")}},
            "log_config": str(d / "log.yaml"),
            "media_store_path": str(d / "media"),
            "signing_key_path": str(d / "signing.key"),
            "registration_shared_secret": SHARED_SECRET,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "report_stats": False,
            "macaroon_secret_key": uuid.uuid4().hex,
            "form_secret": uuid.uuid4().hex,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            # Tests make many requests fast; the 429 test lowers one user's limit
            # through the admin API instead.
            "rc_message": lots,
            "rc_registration": lots,
            "rc_login": {"address": lots, "account": lots, "failed_attempts": lots},
            "rc_joins": {"local": lots, "remote": lots},
            "rc_joins_per_room": lots,
            "rc_invites": {"per_room": lots, "per_user": lots, "per_issuer": lots},
            "rc_admin_redaction": lots,
            "rc_key_requests": lots,
            "rc_3pid_validation": lots,
            "rc_room_creation": lots,
        }
        # JSON is YAML: no YAML library needed here.
        (d / "homeserver.yaml").write_text(json.dumps(config, indent=1))

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until the client API answers."""
        started = time.monotonic()
        self._spawn()
        while time.monotonic() - started < timeout:
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"synapse did not answer within {timeout} s: {self._log_tail()}")

    async def restart(self, timeout: float = 60.0) -> None:
        """Start the stopped server again from a trio test, and wait until it answers.

        The process is spawned on the calling thread: its parent-death signal follows the
        thread that forked it, so a server spawned from a worker thread would be killed
        when trio retires that thread, some seconds later."""
        self._spawn()
        with trio.move_on_after(timeout):
            while not await trio.to_thread.run_sync(self._answers):
                await trio.sleep(0.05)
            return
        raise RuntimeError(f"synapse did not answer again within {timeout} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")[-2000:]

    def _spawn(self) -> None:
        with open(self.directory / "stderr.log", "ab") as errors:
            self.process = subprocess.Popen(
                [str(self.python), "-m", "synapse.app.homeserver", "-c", str(self.directory / "homeserver.yaml")],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                cwd=self.directory,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"synapse exited with {self.process.returncode}: {self._log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=1):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _post(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            result: dict[str, Any] = json.loads(answer.read() or b"{}")
            return result

    async def get(self, url: str, token: str | None) -> bytes:
        """GET ``url`` from a trio test (with ``Authorization: Bearer token`` when given);
        its body, or :class:`urllib.error.HTTPError` for an error status."""

        def get() -> bytes:
            request = urllib.request.Request(url)
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            with urllib.request.urlopen(request, timeout=30) as answer:
                body: bytes = answer.read()
                return body

        return await trio.to_thread.run_sync(get)

    def register(self, localpart: str, password: str = "secret-pw", *, admin: bool = False) -> dict[str, Any]:
        """Create a user through the shared-secret admin API; return its login."""
        with urllib.request.urlopen(f"{self.url}/_synapse/admin/v1/register", timeout=30) as answer:
            nonce = json.loads(answer.read())["nonce"]
        mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(f"{nonce}\0{localpart}\0{password}\0{'admin' if admin else 'notadmin'}".encode())
        return self._post(
            "/_synapse/admin/v1/register",
            {"nonce": nonce, "username": localpart, "password": password, "admin": admin, "mac": mac.hexdigest()},
        )

    def override_ratelimit(self, user_id: str, per_second: float, burst: int) -> None:
        """Give one user a message rate limit of its own (admin API)."""
        admin = self.register(f"admin-{uuid.uuid4().hex[:8]}", admin=True)
        quoted = urllib.parse.quote(user_id)
        self._post(
            f"/_synapse/admin/v1/users/{quoted}/override_ratelimit",
            {"messages_per_second": per_second, "burst_count": burst},
            admin["access_token"],
        )


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    """A running Synapse, shared by the session's tests (users are unique per test)."""
    try:
        started = time.monotonic()
        python = synapse_python()
        installed = time.monotonic() - started
        server = Synapse(python, tmp_path_factory.mktemp("synapse"))
        server.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        server_unavailable("synapse", str(error))
    server_used("synapse", f"{SYNAPSE_VERSION} ({python})")
    log.info("synapse ready: install/lookup %.1f s, startup %.2f s", installed, server.startup_seconds)
    print(f"\nsynapse {SYNAPSE_VERSION}: venv ready in {installed:.1f} s, answered in {server.startup_seconds:.2f} s")
    try:
        yield server
    finally:
        server.stop()


def unique(prefix: str) -> str:
    """A localpart no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- the person


class Person:
    """A Matrix user driven by matrix-nio's AsyncClient, on its own asyncio loop thread.

    Everything the person receives (decrypted where needed) lands in :attr:`events`;
    tests wait for what they expect with :meth:`wait_for`.
    """

    def __init__(self, synapse: Synapse, localpart: str, store: Path) -> None:
        self.synapse = synapse
        self.localpart = localpart
        self.user_id = f"@{localpart}:{synapse.server_name}"
        self.password = "person-pw"
        self.store = store
        self.events: list[tuple[str, Any]] = []
        #: Every typing notice: the room and who was typing there then.
        self.typing: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"person-{localpart}", daemon=True)
        self.client: nio.AsyncClient | None = None
        self._syncing: asyncio.Task[Any] | None = None

    async def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
        """Run ``make()`` on the person's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(make(), self._loop)
        return await trio.to_thread.run_sync(future.result, timeout, abandon_on_cancel=True)

    async def start(self) -> None:
        """Register, log in and start syncing."""
        self._thread.start()
        self.synapse.register(self.localpart, self.password)

        async def begin() -> None:
            client = nio.AsyncClient(
                self.synapse.url,
                self.user_id,
                store_path=str(self.store),
                config=nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
            )
            self.client = client
            response = await client.login(self.password, device_name="person")
            assert isinstance(response, nio.LoginResponse), response
            client.add_event_callback(self._on_event, nio.RoomMessage)
            client.add_event_callback(self._on_event, nio.MegolmEvent)
            client.add_event_callback(self._on_event, nio.InviteMemberEvent)
            client.add_event_callback(self._on_event, nio.ReactionEvent)
            client.add_ephemeral_callback(self._on_typing, nio.TypingNoticeEvent)
            await client.sync(timeout=0, full_state=True)
            self._syncing = asyncio.ensure_future(client.sync_forever(timeout=3000))

        await self.call(begin)

    def _on_event(self, room: nio.MatrixRoom, event: Any) -> None:
        with self._lock:
            self.events.append((room.room_id, event))

    def _on_typing(self, room: nio.MatrixRoom, event: Any) -> None:
        with self._lock:
            self.typing.append((room.room_id, list(event.users)))

    async def stop(self) -> None:
        """Stop syncing and close the client and its loop."""

        async def end() -> None:
            if self._syncing is not None:
                self._syncing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._syncing
            if self.client is not None:
                await self.client.close()
                if self.client.store is not None:
                    self.client.store.database.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                await self.call(end, timeout=20)
            self._loop.call_soon_threadsafe(self._loop.stop)
            await trio.to_thread.run_sync(self._thread.join, 10)
        self._loop.close()

    async def restart_sync_if_stopped(self) -> None:
        """Start syncing again if an outage ended the sync loop."""

        async def again() -> None:
            if self._syncing is not None and self._syncing.done():
                self._syncing = asyncio.ensure_future(self.nio.sync_forever(timeout=3000))

        await self.call(again)

    @property
    def nio(self) -> nio.AsyncClient:
        assert self.client is not None
        return self.client

    async def create_room(
        self, *, invite: Sequence[str] = (), encrypted: bool = False, direct: bool = False, public: bool = False
    ) -> str:
        """Create a room and invite others; return its id. A ``public`` room may be
        joined by anyone, also again after leaving it."""
        initial_state = [nio.EnableEncryptionBuilder().as_dict()] if encrypted else []
        if direct:
            preset = nio.RoomPreset.trusted_private_chat
        else:
            preset = nio.RoomPreset.public_chat if public else nio.RoomPreset.private_chat
        response = await self.call(
            lambda: self.nio.room_create(
                invite=list(invite), is_direct=direct, initial_state=initial_state, preset=preset
            )
        )
        assert isinstance(response, nio.RoomCreateResponse), response
        room_id: str = response.room_id
        # Wait until our own sync knows the room (needed to encrypt for it).
        await self.wait_until(lambda: room_id in self.nio.rooms)
        return room_id

    async def invite(self, room_id: str, user_id: str) -> None:
        response = await self.call(lambda: self.nio.room_invite(room_id, user_id))
        assert isinstance(response, nio.RoomInviteResponse), response

    async def wait_joined(self, room_id: str, user_id: str, timeout: float = 30.0) -> None:
        """Wait until ``user_id`` is a joined member of the room, as the person sees it."""

        def joined() -> bool:
            room = self.nio.rooms.get(room_id)
            return room is not None and user_id in room.users and user_id not in room.invited_users

        await self.wait_until(joined, timeout)

    async def say(self, room_id: str, body: str, **extra: Any) -> str:
        """Send an ``m.text`` message (encrypted in an encrypted room); return its event id."""
        return await self.send_event(room_id, "m.room.message", {"msgtype": "m.text", "body": body, **extra})

    async def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Send an event as nio does (encrypted in an encrypted room, reactions too);
        return its event id."""

        async def send() -> Any:
            room = self.nio.rooms[room_id]
            if room.encrypted:
                # Make sure we know the bot's devices before encrypting for them.
                await self.nio.joined_members(room_id)
                if self.nio.should_query_keys:
                    await self.nio.keys_query()
            return await self.nio.room_send(room_id, event_type, content, ignore_unverified_devices=True)

        response = await self.call(send)
        assert isinstance(response, nio.RoomSendResponse), response
        return str(response.event_id)

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        """React to ``event_id`` with ``key``; return the reaction's event id."""
        relation = {"rel_type": "m.annotation", "event_id": event_id, "key": key}
        return await self.send_event(room_id, "m.reaction", {"m.relates_to": relation})

    async def edit(self, room_id: str, event_id: str, body: str) -> str:
        """Replace the person's message ``event_id`` by ``body``, as Element does."""
        return await self.send_event(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": f"* {body}",
                "m.new_content": {"msgtype": "m.text", "body": body},
                "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
            },
        )

    async def send_file(self, room_id: str, data: bytes, name: str, media_type: str, **extra: Any) -> str:
        """Upload ``data`` (encrypted for an encrypted room) and post it as a file message
        (``m.image`` for images); return the event id."""
        encrypted = bool(self.nio.rooms[room_id].encrypted)

        async def upload() -> Any:
            return await self.nio.upload(
                io.BytesIO(data), content_type=media_type, filename=name, encrypt=encrypted, filesize=len(data)
            )

        response, keys = await self.call(upload)
        assert isinstance(response, nio.UploadResponse), response
        content: dict[str, Any] = {
            "msgtype": "m.image" if media_type.startswith("image/") else "m.file",
            "body": name,
            "info": {"mimetype": media_type, "size": len(data)},
            **extra,
        }
        if keys is not None:
            content["file"] = {**keys, "url": response.content_uri}
        else:
            content["url"] = response.content_uri
        return await self.send_event(room_id, "m.room.message", content)

    async def download(self, mxc: str) -> bytes:
        """Fetch media by its mxc url from the homeserver, with the person's token."""
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        url = f"{self.synapse.url}/_matrix/client/v1/media/download/{server}/{media_id}"
        return await self.synapse.get(url, self.nio.access_token)

    def reactions_from(self, sender: str, room_id: str) -> list[Any]:
        """Reactions (``nio.ReactionEvent``) the person saw from ``sender`` in ``room_id``."""
        with self._lock:
            return [
                e for r, e in self.events if isinstance(e, nio.ReactionEvent) and e.sender == sender and r == room_id
            ]

    def messages_from(self, sender: str, room_id: str | None = None) -> list[Any]:
        """Messages the person received from ``sender`` (in ``room_id``)."""
        with self._lock:
            return [
                event
                for room, event in self.events
                if isinstance(event, nio.RoomMessage)
                and event.sender == sender
                and (room_id is None or room == room_id)
            ]

    async def wait_for_message(
        self, sender: str, room_id: str, predicate: Callable[[Any], bool] = lambda e: True, timeout: float = 30.0
    ) -> Any:
        """Wait for a message from ``sender`` in ``room_id`` that satisfies ``predicate``."""
        found: list[Any] = []

        def check() -> bool:
            found[:] = [e for e in self.messages_from(sender, room_id) if predicate(e)]
            return bool(found)

        await self.wait_until(check, timeout)
        return found[0]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll ``condition`` (it reads state another thread updates) until it holds."""
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(0.05)


@pytest.fixture
async def person(synapse: Synapse, tmp_path: Path) -> Any:
    """A person with a fresh account, syncing."""
    store = tmp_path / "person-store"
    store.mkdir()
    someone = Person(synapse, unique("person"), store)
    await someone.start()
    try:
        yield someone
    finally:
        await someone.stop()


# --------------------------------------------------------------------------- the bot


def answer_ping(adapter: MatrixAdapter) -> Callable[[IncomingMessage], Awaitable[None]]:
    """A stand-in for a callback, for ``RecordingHost.on_message``: a message whose text
    holds ``ping<rest>`` is answered ``PONG<rest>`` in its room, in reply to it.

    Deliberately no addressing or edit rules: which messages get answered is the router's
    business (tested in oco-core, and end to end in test_oco_run.py); these tests check
    what the adapter delivers and how it sends the answer."""

    async def answer(message: IncomingMessage) -> None:
        _, ping, rest = message.body.partition("ping")
        if ping and message.room is not None:
            # In the message's thread, as the bot's answers are (the SDK's reply too).
            pong = OutgoingMessage(
                f"PONG{rest}", room_id=message.room.id, in_reply_to=message.id, thread_id=message.thread_id
            )
            await adapter.send(pong)

    return answer


class Bot:
    """A bot account with its adapter config; :meth:`running` runs a fresh adapter for it,
    always with the same host store and key path, as a restarted bot would."""

    def __init__(self, synapse: Synapse, tmp_path: Path, **options: Any) -> None:
        self.synapse = synapse
        self.localpart = unique("bot")
        self.password = "bot-pw"
        #: The registration's login (its access token is used by a test).
        self.registration = synapse.register(self.localpart, self.password)
        self.user_id = f"@{self.localpart}:{synapse.server_name}"
        self.host = RecordingHost("matrix")
        self.options = {
            "homeserver": synapse.url,
            "user_id": self.user_id,
            "password": self.password,
            "store_path": str(tmp_path / "bot-keys"),
            "autojoin_invites": ["@person-*:localhost"],
            **options,
        }
        self.adapter: MatrixAdapter | None = None

    async def access_token(self) -> str:
        """The token the adapter logged in with (kept in its store)."""
        item = await self.host.memory.get("adapter:matrix", "access_token")
        assert item is not None, "the adapter has not logged in"
        return item.value.decode()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MatrixAdapter]:
        """Run a new adapter until the block ends."""
        adapter = MatrixAdapter(MatrixConfig.model_validate(self.options))
        self.adapter = adapter
        self.host.on_message = answer_ping(adapter)
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.run, self.host)
            yield adapter
            nursery.cancel_scope.cancel()

    async def room_with(
        self, person: Person, *, encrypted: bool = False, in_process: bool = True, public: bool = False
    ) -> str:
        """A group room (the person, the bot and an invited third account) the bot joined.

        With ``in_process`` (the adapter runs in this test, not in an ``oco`` process) it
        also waits until the adapter's own sync has seen the join."""
        third = unique("third")
        self.synapse.register(third)
        room_id = await person.create_room(
            invite=[self.user_id, f"@{third}:localhost"], encrypted=encrypted, public=public
        )
        await person.wait_joined(room_id, self.user_id)
        if not in_process:
            return room_id
        await self.host.next_membership(
            lambda e: e.kind is MembershipKind.JOINED and e.user.id == self.user_id and e.room.id == room_id,
            what="the bot's own join",
        )
        return room_id


@pytest.fixture
def make_bot(synapse: Synapse, tmp_path: Path) -> Callable[..., Bot]:
    """Make a bot account; keyword arguments are adapter options."""
    return lambda **options: Bot(synapse, tmp_path, **options)


# --------------------------------------------------------------------------- the contract


class MatrixPerson(ChatPerson):
    """The contract's person on Synapse: :class:`Person` (matrix-nio), in a public room
    with the bot; its private messages go through a direct chat it opens."""

    #: Synapse refuses an event whose JSON is larger than 64 KiB.
    max_message_bytes = 65536

    def __init__(self, person: Person, bot: Bot, room: str) -> None:
        self.person = person
        self.bot = bot
        self.user_id = person.user_id
        # Synapse gives a new account its localpart as display name, and rooms show that.
        self.name = person.localpart
        self.room = room
        self._direct: set[str] = set()
        self._from_bot = SeenByPerson(self.user_id, self._seen, poll=0.05)

    async def say(self, room: str, text: str) -> None:
        await self.person.say(room, text)

    async def say_privately(self, text: str) -> None:
        if not self._direct:
            room_id = await self.person.create_room(invite=[self.bot.user_id], direct=True)
            await self.person.wait_joined(room_id, self.bot.user_id)
            self._direct.add(room_id)
        await self.person.say(next(iter(self._direct)), text)

    async def join(self, room: str) -> None:
        response = await self.person.call(lambda: self.person.nio.join(room))
        assert isinstance(response, nio.JoinResponse), response
        await self.person.wait_joined(room, self.user_id)

    async def leave(self, room: str) -> None:
        response = await self.person.call(lambda: self.person.nio.room_leave(room))
        assert isinstance(response, nio.RoomLeaveResponse), response

    def _seen(self) -> list[SeenMessage]:
        seen = []
        for room_id, event in self.person.events:
            if not isinstance(event, nio.RoomMessage) or event.sender != self.bot.user_id:
                continue
            content = event.source.get("content") or {}
            mentions = (content.get("m.mentions") or {}).get("user_ids") or []
            seen.append(
                SeenMessage(
                    body=str(getattr(event, "body", "")),
                    room=None if room_id in self._direct else room_id,
                    mentions=frozenset(mentions),
                    size=len(json.dumps(event.source, ensure_ascii=False).encode()),
                )
            )
        return seen

    async def next_from_bot(self, predicate: Callable[[SeenMessage], bool], *, timeout: float) -> SeenMessage:
        return await self._from_bot.next(predicate, timeout=timeout)

    async def interrupt(self) -> None:
        # The adapter's requests fail from here on; it keeps what it is asked to send
        # (with its transaction ids) until the homeserver answers again.
        await trio.to_thread.run_sync(self.person.synapse.stop)

    async def restore(self) -> None:
        await self.person.synapse.restart()
        await self.person.restart_sync_if_stopped()


@pytest.fixture
async def live_chat(person: Person, make_bot: Callable[..., Bot]) -> AsyncIterator[LiveChat]:
    """A bot account's adapter running, in a public room with ``person``."""
    bot = make_bot()
    async with bot.running() as adapter:
        bot.host.on_message = None  # the contract answers nothing by itself
        room = await bot.room_with(person, public=True)
        yield LiveChat(adapter, bot.host, MatrixPerson(person, bot, room))
