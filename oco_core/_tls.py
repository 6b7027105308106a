"""TLS material for the gRPC API: PEM files read and checked before grpcio sees them.

grpcio takes any bytes for a certificate or a key and fails later, in words that never
name the file: a server "fails to bind", a client's handshake fails on every retry. The
edge (``grpc.tls`` and ``callbacks[].tls_*``) and the SDK (its ``tls_*`` arguments and
``OCO_TLS_*``) read them here, so that every error names the setting and the path.

Functions here block (file reads); call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ._bridge import ClientTls, ServerTls

if TYPE_CHECKING:
    from ._config import LoadedConfig  # the bot's (pydantic, yaml); a callback's SDK needs neither

log = logging.getLogger(__name__)

#: A PEM file's path, or its contents.
PemSource = str | os.PathLike[str] | bytes

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


def read_pem(source: PemSource, kind: Literal["certificate", "private key"]) -> bytes:
    """The PEM bytes of ``source`` (a path, or the bytes themselves), checked to hold at
    least one ``kind``. ValueError says what is wrong and names the path, not the setting."""
    if isinstance(source, bytes):
        data, where = source, "the PEM data given"
    else:
        path = Path(source)
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not PEM text (DER? convert it with `openssl x509 -outform PEM`)") from None
    if kind == "certificate":
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
        except ssl.SSLError:
            raise ValueError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    else:
        if "ENCRYPTED" in text:
            raise ValueError(f"{where} is an encrypted private key; gRPC needs it unencrypted")
        if not _PRIVATE_KEY.search(text):
            raise ValueError(f"{where} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    return data


def check_key_pair(cert: Path, key: Path) -> None:
    """ValueError unless ``key`` is the private key of the (first) certificate in ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # read_pem refused encrypted keys; the callback only keeps OpenSSL from ever
        # prompting on a terminal for a password.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"{key} is not the private key of the certificate in {cert} ({reason})") from None


def load_server_tls(loaded: LoadedConfig) -> ServerTls | None:
    """Read and check every TLS file the config names (``grpc.tls.*`` and
    ``callbacks[].tls_cert``/``tls_key``): the server's now, the launched callbacks'
    before they fail one by one. None without ``grpc.tls``. ConfigError names the key,
    its line and the path."""
    tls = loaded.config.grpc.tls
    if tls is None:
        for callback in loaded.config.callbacks:
            if callback.tls_cert is not None:
                log.warning("callback %r has a tls_cert, but without grpc.tls the API is plaintext", callback.id)
        return None

    def read(loc: tuple[str | int, ...], path: Path, kind: Literal["certificate", "private key"]) -> bytes:
        try:
            return read_pem(path, kind)
        except ValueError as exc:
            raise loaded.error(loc, str(exc)) from None

    def pair(loc: tuple[str | int, ...], cert: Path, key: Path) -> None:
        try:
            check_key_pair(cert, key)
        except ValueError as exc:
            raise loaded.error(loc, str(exc)) from None

    cert_chain = read(("grpc", "tls", "cert"), tls.cert, "certificate")
    key = read(("grpc", "tls", "key"), tls.key, "private key")
    pair(("grpc", "tls", "key"), tls.cert, tls.key)
    client_ca = read(("grpc", "tls", "client_ca"), tls.client_ca, "certificate") if tls.client_ca else None
    if tls.server_ca is not None:
        read(("grpc", "tls", "server_ca"), tls.server_ca, "certificate")
    for index, callback in enumerate(loaded.config.callbacks):
        if callback.tls_cert is not None and callback.tls_key is not None:
            read(("callbacks", index, "tls_cert"), callback.tls_cert, "certificate")
            read(("callbacks", index, "tls_key"), callback.tls_key, "private key")
            pair(("callbacks", index, "tls_key"), callback.tls_cert, callback.tls_key)
        elif client_ca is not None and callback.command is not None and "OCO_TLS_CERT" not in callback.env:
            # It will be launched, refused at every handshake, and restarted forever.
            log.warning(
                "callback %r has no tls_cert and tls_key: under mutual TLS (grpc.tls.client_ca) the bot will refuse it",
                callback.id,
            )
    log.info("gRPC API over TLS%s", ", client certificates required" if client_ca else "")
    return ServerTls(cert_chain=cert_chain, key=key, client_ca=client_ca)


def load_client_tls(
    ca: PemSource | None, cert: PemSource | None, key: PemSource | None, server_name: str | None
) -> ClientTls | None:
    """What a callback dials the bot with: None (plaintext) when nothing is given.
    ValueError names the setting (argument and environment variable) and the path."""
    if ca is None and cert is None and key is None and not server_name:
        return None
    if (cert is None) != (key is None):
        raise ValueError("give both tls_cert and tls_key (OCO_TLS_CERT and OCO_TLS_KEY), or neither")

    def read(name: str, source: PemSource | None, kind: Literal["certificate", "private key"]) -> bytes | None:
        if source is None:
            return None
        try:
            return read_pem(source, kind)
        except ValueError as exc:
            raise ValueError(f"{name} (OCO_{name.upper()}): {exc}") from None

    client = ClientTls(
        ca=read("tls_ca", ca, "certificate"),
        cert_chain=read("tls_cert", cert, "certificate"),
        key=read("tls_key", key, "private key"),
        server_name=server_name or None,
    )
    if cert is not None and key is not None and not isinstance(cert, bytes) and not isinstance(key, bytes):
        try:
            check_key_pair(Path(cert), Path(key))
        except ValueError as exc:
            raise ValueError(f"tls_key (OCO_TLS_KEY): {exc}") from None
    return client
