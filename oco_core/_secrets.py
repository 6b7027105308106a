"""Callback secrets: who is calling.

A secret is looked up by its SHA-256 digest and then compared with
``hmac.compare_digest``, so neither the lookup nor the comparison takes a time that
depends on how much of a guess was right. Secrets never reach a log line.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

from ._bridge import CallInfo, RpcAbort


class Authenticator:
    """Maps the secret in a call's metadata to the callback it belongs to."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self._by_digest = {hashlib.sha256(s.encode()).digest(): (cid, s) for cid, s in secrets.items() if s}

    async def identify(self, info: CallInfo) -> str:
        """The callback id of the caller, or UNAUTHENTICATED."""
        header = info.metadata.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise RpcAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing secret: send gRPC metadata `authorization: Bearer <secret>` with every call",
            )
        found = self._by_digest.get(hashlib.sha256(secret.encode()).digest())
        if found is None or not hmac.compare_digest(found[1].encode(), secret.encode()):
            raise RpcAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown secret: check the callback's secret against the bot's configuration",
            )
        return found[0]
