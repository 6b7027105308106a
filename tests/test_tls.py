"""The gRPC API over TLS and mutual TLS, end to end: real `oco run` processes, callbacks
it launches (Python SDK, Node.js example), and real gRPC clients dialling by hand.

Certificates come from `trustme`: a CA that signs the bot's certificate and the
callbacks' client certificates (their id as common name or subject alternative name),
and a second CA nobody trusts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio
import trustme

from oco_core import Callback, CallbackError, Message
from oco_core._proto import storage_pb2, storage_pb2_grpc
from oco_core.testing import run_oco

ALPHA_SECRET = "alpha-secret-0123456789abcdef"
#: The name in the mutual-TLS bot's certificate; it is not the address dialled.
BOT_NAME = "bot.internal"


@dataclass
class Leaf:
    """A certificate and its key, as files and as PEM bytes."""

    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes


@dataclass
class Pki:
    """Everything these tests need signed, written under one directory."""

    ca: Path
    ca_pem: bytes
    server: Leaf  # for localhost and 127.0.0.1
    named_server: Leaf  # for BOT_NAME only
    alpha: Leaf  # SAN "alpha"
    example: Leaf  # CN "example" (the bundled callback's id), SAN something else
    node: Leaf  # SAN "node"
    beta: Leaf  # SAN "beta": signed by the right CA, for another callback
    stranger_ca_pem: bytes
    stranger_alpha: Leaf  # SAN "alpha", signed by a CA the bot does not trust


def _leaf(ca: trustme.CA, directory: Path, name: str, *identities: str, common_name: str | None = None) -> Leaf:
    issued = ca.issue_cert(*identities, common_name=common_name)
    leaf = Leaf(
        directory / f"{name}.crt",
        directory / f"{name}.key",
        b"".join(blob.bytes() for blob in issued.cert_chain_pems),
        issued.private_key_pem.bytes(),
    )
    leaf.cert.write_bytes(leaf.cert_pem)
    leaf.key.write_bytes(leaf.key_pem)
    return leaf


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.crt")
    return Pki(
        ca=directory / "ca.crt",
        ca_pem=ca.cert_pem.bytes(),
        server=_leaf(ca, directory, "server", "localhost", "127.0.0.1"),
        named_server=_leaf(ca, directory, "named-server", BOT_NAME),
        alpha=_leaf(ca, directory, "alpha", "alpha"),
        example=_leaf(ca, directory, "example", "unrelated.example", common_name="example"),
        node=_leaf(ca, directory, "node", "node"),
        beta=_leaf(ca, directory, "beta", "beta"),
        stranger_ca_pem=stranger.cert_pem.bytes(),
        stranger_alpha=_leaf(stranger, directory, "stranger-alpha", "alpha"),
    )


def tls_config(tmp_path: Path, tls: str, callbacks: str) -> str:
    """A bot on the shell adapter (user alice) whose API is served with ``grpc.tls: {tls}``."""
    return (
        f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n'
        f'grpc: {{listen: "127.0.0.1:0", tls: {{{tls}}}}}\n'
        "adapters: [{type: shell, user: alice}]\n"
        f"callbacks:\n{callbacks}"
    )


def server_tls(pki: Pki) -> str:
    """grpc.tls for TLS only, the bot's certificate naming 127.0.0.1."""
    return f'cert: "{pki.server.cert}", key: "{pki.server.key}", server_ca: "{pki.ca}"'


def mutual_tls(pki: Pki) -> str:
    """grpc.tls for mutual TLS, the bot's certificate naming only BOT_NAME."""
    return (
        f'cert: "{pki.named_server.cert}", key: "{pki.named_server.key}", client_ca: "{pki.ca}", '
        f'server_ca: "{pki.ca}", server_name: "{BOT_NAME}"'
    )


def storage_set(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    server_name: str | None = None,
    secret: str = ALPHA_SECRET,
) -> tuple[grpc.StatusCode, str]:
    """One Storage.Set by hand (plaintext without ``credentials``): its status and details."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        try:
            storage_pb2_grpc.StorageStub(channel).Set(
                storage_pb2.SetRequest(key="probe", value=b"1"),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=15,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def by_hand(
    address: str, credentials: grpc.ChannelCredentials | None, **kwargs: str
) -> tuple[grpc.StatusCode, str]:
    return await trio.to_thread.run_sync(lambda: storage_set(address, credentials, **kwargs))


def credentials(ca: bytes, client: Leaf | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca)
    return grpc.ssl_channel_credentials(ca, client.key_pem, client.cert_pem)


# -- TLS -------------------------------------------------------------------------------


async def test_a_launched_sdk_callback_answers_over_tls(tmp_path: Path, pki: Pki, example_command: str) -> None:
    config = tls_config(tmp_path, server_tls(pki), f"  - {{id: example, command: {example_command}}}\n")
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.write("oco ping")
        await bot.expect(r"^PONG$")
        await bot.expect(r"callback 'example' connected to 127\.0\.0\.1:\d+ over TLS", stream="stderr")


async def test_tls_refuses_plaintext_and_untrusting_clients(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, server_tls(pki), f"  - {{id: alpha, secret: {ALPHA_SECRET}}}\n")
    async with run_oco(config, tmp_path / "bot") as bot:
        assert await by_hand(bot.address, credentials(pki.ca_pem)) == (grpc.StatusCode.OK, "")
        code, _ = await by_hand(bot.address, None)
        assert code == grpc.StatusCode.UNAVAILABLE
        code, details = await by_hand(bot.address, credentials(pki.stranger_ca_pem))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "handshake" in details.lower()
        # The secret is still required over TLS.
        code, _ = await by_hand(bot.address, credentials(pki.ca_pem), secret="not-the-secret-0123456789")
        assert code == grpc.StatusCode.UNAUTHENTICATED


# -- mutual TLS ------------------------------------------------------------------------


async def test_mtls_callbacks_with_their_own_certificates_are_served(
    tmp_path: Path, pki: Pki, example_command: str
) -> None:
    example = f'tls_cert: "{pki.example.cert}", tls_key: "{pki.example.key}"'
    callbacks = (
        f"  - {{id: example, command: {example_command}, {example}}}\n  - {{id: alpha, secret: {ALPHA_SECRET}}}\n"
    )
    async with run_oco(tls_config(tmp_path, mutual_tls(pki), callbacks), tmp_path / "bot") as bot:
        # Launched by the bot, its certificate naming it by common name.
        await bot.write("oco ping")
        await bot.expect(r"^PONG$")

        # Started by hand with the SDK, its certificate naming it by subject alternative name.
        cb = Callback(
            id="alpha",
            secret=ALPHA_SECRET,
            address=bot.address,
            tls_ca=pki.ca,
            tls_cert=str(pki.alpha.cert),
            tls_key=pki.alpha.key_pem,
            tls_server_name=BOT_NAME,
        )

        @cb.respond(r"^hello$")
        async def hello(message: Message) -> None:
            await message.send("hello over mutual TLS")

        async with trio.open_nursery() as nursery:
            await nursery.start(cb.serve)
            await bot.write("oco hello")
            await bot.expect(r"^hello over mutual TLS$")
            nursery.cancel_scope.cancel()

        creds = credentials(pki.ca_pem, pki.alpha)
        assert await by_hand(bot.address, creds, server_name=BOT_NAME) == (grpc.StatusCode.OK, "")
        # The certificate does not replace the secret.
        code, _ = await by_hand(bot.address, creds, server_name=BOT_NAME, secret="not-the-secret-0123456789")
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_mtls_refuses_missing_foreign_and_borrowed_certificates(
    tmp_path: Path, pki: Pki, example_command: str
) -> None:
    callbacks = (
        # The bundled callback launched with beta's (valid) certificate.
        f'  - {{id: example, command: {example_command}, tls_cert: "{pki.beta.cert}", tls_key: "{pki.beta.key}"}}\n'
        f"  - {{id: alpha, secret: {ALPHA_SECRET}}}\n"
    )
    async with run_oco(tls_config(tmp_path, mutual_tls(pki), callbacks), tmp_path / "bot") as bot:
        await bot.expect(
            r"oco\.callback\.example: callback 'example': the bot refused this callback: "
            r"the client certificate is not for callback 'example': it names 'beta'",
            stream="stderr",
        )
        address = bot.address
        code, _ = await by_hand(address, credentials(pki.ca_pem), server_name=BOT_NAME)
        assert code == grpc.StatusCode.UNAVAILABLE
        code, _ = await by_hand(address, credentials(pki.ca_pem, pki.stranger_alpha), server_name=BOT_NAME)
        assert code == grpc.StatusCode.UNAVAILABLE
        code, details = await by_hand(address, credentials(pki.ca_pem, pki.beta), server_name=BOT_NAME)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "not for callback 'alpha'" in details
        assert "it names 'beta'" in details
        # The bot's own log says so too, once per callback and reason (not only the audit log).
        await bot.expect(
            r" WARNING oco_core\._edge: refused callback 'alpha' from ipv4:127\.0\.0\.1:\d+: "
            r"the client certificate is not for callback 'alpha'",
            stream="stderr",
        )
        assert len([line for line in bot.stderr_lines if "refused callback 'example'" in line]) == 1
        # The bot serves the right certificate still.
        assert await by_hand(address, credentials(pki.ca_pem, pki.alpha), server_name=BOT_NAME) == (
            grpc.StatusCode.OK,
            "",
        )
        assert await bot.stop() == 0
    # The borrowed certificate is in the audit log (the launched callback's refusals came
    # from the same host within the minute: counted, not repeated).
    config = str(tmp_path / "bot" / "oco.yaml")
    command = [sys.executable, "-m", "oco_core", "audit", "--config", config, "--json", "--kind", "authentication"]
    audit = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert audit.returncode == 0, audit.stderr.decode()
    records = [json.loads(line) for line in audit.stdout.decode().splitlines()]
    assert records, "no refusal was audited"
    assert records[0]["decision"] == "denied"
    assert "the client certificate is not for callback" in records[0]["detail"]


# -- the Node.js example ---------------------------------------------------------------


@pytest.mark.server("node")
@pytest.mark.parametrize("mode", ["tls", "mutual tls"])
async def test_the_node_example_connects_over_tls(node_example: Path, tmp_path: Path, pki: Pki, mode: str) -> None:
    command = f'["node", "{node_example / "callback.js"}"]'
    if mode == "tls":
        config = tls_config(tmp_path, server_tls(pki), f"  - {{id: node, command: {command}}}\n")
    else:
        callback = f'{{id: node, command: {command}, tls_cert: "{pki.node.cert}", tls_key: "{pki.node.key}"}}'
        config = tls_config(tmp_path, mutual_tls(pki), f"  - {callback}\n")
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.write("oco ping")
        await bot.expect(r"^PONG from Node\.js$")
        await bot.write("oco count")
        await bot.expect(r"^alice: node counter is 1$")
        await bot.expect(r"\[node-callback node\] connected to .* over TLS: 6 route\(s\) registered", stream="stderr")


# -- configuration errors --------------------------------------------------------------


async def run_to_exit(config: str, workdir: Path, command: str = "run") -> tuple[int, list[str]]:
    """Run `oco <command>` with ``config`` until it exits: its exit code and standard error."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "oco.yaml").write_text(config)
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "oco_core", command, "--config", str(workdir / "oco.yaml")],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stderr.decode().splitlines()


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("problem", ["missing cert", "key of another cert", "unreadable callback cert"])
async def test_bad_tls_files_stop_the_bot_with_one_line_naming_the_key(
    tmp_path: Path, pki: Pki, problem: str, command: str
) -> None:
    missing = tmp_path / "nowhere" / "server.crt"
    if problem == "missing cert":
        tls, callbacks, key, shown = f'cert: "{missing}", key: "{pki.server.key}"', "", "grpc.tls.cert", missing
    elif problem == "key of another cert":
        tls, callbacks = f'cert: "{pki.server.cert}", key: "{pki.alpha.key}"', ""
        key, shown = "grpc.tls.key", pki.alpha.key
    else:
        tls = server_tls(pki)
        callbacks = f'  - {{id: alpha, command: ["true"], tls_cert: "{pki.ca.parent}", tls_key: "{pki.alpha.key}"}}\n'
        key, shown = "callbacks[0].tls_cert", pki.ca.parent
    code, stderr = await run_to_exit(tls_config(tmp_path, tls, callbacks or "  []\n"), tmp_path / "bot", command)
    errors = [line for line in stderr if line.startswith("oco: error:")]
    assert code == 3, stderr  # EXIT_CONFIG
    assert len(errors) == 1, stderr
    assert re.search(rf"oco\.yaml, line \d+: {re.escape(key)}: .*{re.escape(str(shown))}", errors[0]), errors
    assert not any("Traceback" in line for line in stderr)


async def test_the_tls_environment_reaches_launched_callbacks_only_from_the_config(tmp_path: Path, pki: Pki) -> None:
    """A plaintext bot does not hand its own OCO_TLS_* environment down: its callbacks
    would dial TLS and never connect."""
    config = (
        f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n'
        'grpc: {listen: "127.0.0.1:0"}\n'
        "adapters: [{type: shell, user: alice}]\n"
        f'callbacks: [{{id: example, command: ["{sys.executable}", "-m", "oco_core.examples.ping"]}}]\n'
    )
    async with run_oco(config, tmp_path / "bot", env={"OCO_TLS_CA": str(pki.ca)}) as bot:
        await bot.write("oco ping")
        await bot.expect(r"^PONG$")
        await bot.expect(r"callback 'example' connected to 127\.0\.0\.1:\d+ with", stream="stderr")


async def test_the_sdk_names_the_tls_file_it_cannot_use(tmp_path: Path, pki: Pki) -> None:
    def callback(**tls: Path | bytes) -> Callback:
        return Callback(id="alpha", secret=ALPHA_SECRET, address="127.0.0.1:1", **tls)  # type: ignore[arg-type]

    missing = tmp_path / "missing.pem"
    with pytest.raises(CallbackError, match=rf"^tls_ca \(OCO_TLS_CA\): cannot read {re.escape(str(missing))}: No such"):
        await callback(tls_ca=missing).serve()
    with pytest.raises(CallbackError, match=r"^tls_cert \(OCO_TLS_CERT\): the PEM data given holds no PEM certificate"):
        await callback(tls_cert=pki.alpha.key_pem, tls_key=pki.alpha.key_pem).serve()
    with pytest.raises(CallbackError, match=r"^tls_key \(OCO_TLS_KEY\): .*beta\.key is not the private key of"):
        await callback(tls_cert=pki.alpha.cert, tls_key=pki.beta.key).serve()
    with pytest.raises(CallbackError, match=r"give both tls_cert and tls_key"):
        await callback(tls_cert=pki.alpha.cert).serve()


@pytest.mark.parametrize(("tls", "shown"), [(server_tls, "(TLS)"), (mutual_tls, "(mutual TLS)")])
async def test_check_config_says_how_the_api_is_served(
    tmp_path: Path, pki: Pki, tls: Callable[[Pki], str], shown: str
) -> None:
    workdir = tmp_path / "bot"
    workdir.mkdir()
    (workdir / "oco.yaml").write_text(tls_config(tmp_path, tls(pki), "  []\n"))
    done = await trio.run_process(
        [sys.executable, "-m", "oco_core", "check-config", "--config", str(workdir / "oco.yaml")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert f"127.0.0.1:0 {shown};" in done.stdout.decode()
