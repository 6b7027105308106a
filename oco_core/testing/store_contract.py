"""The store contract: one test suite that every core store must pass.

A store's tests subclass :class:`StoreContract` and provide a ``store`` fixture that
yields an open, empty :class:`~oco_core.plugin.Store` whose value limit equals the
``max_value_bytes`` fixture (1 MiB unless the subclass overrides that fixture)::

    from oco_core.testing.store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self, max_value_bytes):
            async with open_my_store(MyConfig(max_value_bytes=max_value_bytes)) as store:
                yield store

Run it with pytest-trio in ``trio_mode``. Each test uses its own namespaces, so the
fixture may hand out a fresh store per test or clean one up between tests.

:class:`StorageServiceContract` proves the same store behind a real bot, through the
Storage RPC: acknowledged writes survive the bot being killed with SIGKILL, 50
callbacks incrementing one counter with compare-and-set end exact, and a database
outage answers UNAVAILABLE while chat goes on, then heals by itself. Subclass it and
provide ``store_section`` (and ``store_server`` for the outage test).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

from .._errors import QuotaExceededError, StoreError, StoreUnavailableError, ValueTooLargeError, VersionConflictError
from .._quota import QuotaConfig, QuotaStore
from .._store import MAX_KEY_BYTES, Item, Store
from .._timing import Backoff
from ._process import _wait_for_file
from ._proxy import TcpProxy as TcpProxy

__all__ = [
    "ServerOutageContract",
    "StorageServiceContract",
    "StoreContract",
    "TcpProxy",
    "cas_backoff",
    "cas_increment",
    "running_oco",
    "unavailable_message",
]


def _utf8_order(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


async def _list_all(store: Store, namespace: str, prefix: str = "", *, page: int = 100) -> list[Item]:
    items: list[Item] = []
    after = ""
    while True:
        batch = await store.list(namespace, prefix, start_after=after, limit=page)
        items += batch
        if len(batch) < page:
            return items
        after = batch[-1].key


def cas_backoff(first: float = 0.004) -> Backoff:
    """The backoff between retries of a compare-and-set: exponential from ``first`` up to
    0.5 s, with full jitter, so that n contending writers spread out instead of retrying
    in lock step (measured with 50 callbacks on one key: 3x fewer conflicts than a 50 ms
    cap)."""
    return Backoff(first, 0.5, jitter=1.0)


async def unavailable_message(opening: AbstractAsyncContextManager[object]) -> str:
    """Enter ``opening`` (a store's ``open``) whose server cannot be reached and return
    the StoreUnavailableError's message, checked to be one line (it becomes the CLI's
    one-line error and a log line); the caller checks that it names the server with the
    password masked."""
    with pytest.raises(StoreUnavailableError) as info:
        async with opening:
            pass
    message = str(info.value)
    assert "\n" not in message, message
    return message


async def _conflicts(attempt: Awaitable[object], *, current: int) -> None:
    """Await a compare-and-set ``attempt`` that must fail with VersionConflictError
    reporting version ``current``."""
    with pytest.raises(VersionConflictError) as info:
        await attempt
    assert info.value.current == current


async def cas_increment(store: Store, namespace: str, key: str) -> int:
    """Add one to the decimal counter under ``key`` with compare-and-set retries; return
    the number of conflicts met on the way."""
    conflicts = 0
    backoff = cas_backoff()
    while True:
        item = await store.get(namespace, key)
        count, version = (0, 0) if item is None else (int(item.value), item.version)
        try:
            await store.set(namespace, key, str(count + 1).encode(), expected_version=version)
            return conflicts
        except VersionConflictError:
            conflicts += 1
            await backoff.sleep()


class StoreContract:
    """The behaviour every core store promises; subclass it and provide ``store``."""

    @pytest.fixture
    def max_value_bytes(self) -> int:
        """The value limit the ``store`` fixture must configure (override to change; at least 2048)."""
        return 1024 * 1024

    # ---- get / set / delete ----

    async def test_get_missing_is_none(self, store: Store) -> None:
        assert await store.get("ns", "nothing") is None

    async def test_set_then_get(self, store: Store) -> None:
        assert await store.set("ns", "k", b"v") == 1
        assert await store.get("ns", "k") == Item("k", b"v", 1)

    async def test_each_write_adds_one_to_the_version(self, store: Store) -> None:
        for expected in range(1, 6):
            assert await store.set("ns", "k", f"v{expected}".encode()) == expected
        assert await store.get("ns", "k") == Item("k", b"v5", 5)

    async def test_empty_value_is_not_missing(self, store: Store) -> None:
        await store.set("ns", "empty", b"")
        assert await store.get("ns", "empty") == Item("empty", b"", 1)

    async def test_delete(self, store: Store) -> None:
        await store.set("ns", "k", b"v")
        assert await store.delete("ns", "k") is True
        assert await store.get("ns", "k") is None
        assert await store.delete("ns", "k") is False
        assert await store.list("ns") == []

    async def test_version_starts_again_after_delete(self, store: Store) -> None:
        await store.set("ns", "k", b"1")
        await store.set("ns", "k", b"2")
        await store.delete("ns", "k")
        assert await store.set("ns", "k", b"3") == 1

    # ---- compare-and-set ----

    async def test_expected_zero_creates(self, store: Store) -> None:
        assert await store.set("ns", "k", b"new", expected_version=0) == 1
        assert await store.get("ns", "k") == Item("k", b"new", 1)

    async def test_expected_zero_conflicts_when_present(self, store: Store) -> None:
        await store.set("ns", "k", b"a")
        await store.set("ns", "k", b"b")
        await _conflicts(store.set("ns", "k", b"c", expected_version=0), current=2)
        assert await store.get("ns", "k") == Item("k", b"b", 2)

    async def test_expected_version_matches(self, store: Store) -> None:
        await store.set("ns", "k", b"a")
        assert await store.set("ns", "k", b"b", expected_version=1) == 2
        assert await store.set("ns", "k", b"c", expected_version=2) == 3
        assert await store.get("ns", "k") == Item("k", b"c", 3)

    async def test_stale_version_conflicts_and_reports_current(self, store: Store) -> None:
        await store.set("ns", "k", b"a")
        await store.set("ns", "k", b"b")
        await _conflicts(store.set("ns", "k", b"c", expected_version=1), current=2)
        await _conflicts(store.set("ns", "k", b"c", expected_version=7), current=2)
        assert await store.get("ns", "k") == Item("k", b"b", 2)

    async def test_expected_version_on_missing_key_conflicts_with_zero(self, store: Store) -> None:
        await _conflicts(store.set("ns", "k", b"a", expected_version=1), current=0)
        assert await store.get("ns", "k") is None

    async def test_delete_with_expected_version(self, store: Store) -> None:
        await store.set("ns", "k", b"a")
        await store.set("ns", "k", b"b")
        await _conflicts(store.delete("ns", "k", expected_version=1), current=2)
        assert await store.get("ns", "k") == Item("k", b"b", 2)
        assert await store.delete("ns", "k", expected_version=2) is True
        assert await store.get("ns", "k") is None

    async def test_delete_missing_with_expected_version_conflicts(self, store: Store) -> None:
        await _conflicts(store.delete("ns", "k", expected_version=1), current=0)

    async def test_delete_missing_expecting_it_absent_is_false(self, store: Store) -> None:
        assert await store.delete("ns", "k", expected_version=0) is False
        await store.set("ns", "k", b"a")
        await _conflicts(store.delete("ns", "k", expected_version=0), current=1)

    async def test_version_conflict_is_a_store_error(self, store: Store) -> None:
        await store.set("ns", "k", b"a")
        with pytest.raises(StoreError):
            await store.set("ns", "k", b"b", expected_version=0)

    # ---- namespaces ----

    async def test_namespaces_are_isolated(self, store: Store) -> None:
        await store.set("cb:a", "k", b"from a")
        await store.set("cb:b", "k", b"from b")
        assert await store.get("cb:a", "k") == Item("k", b"from a", 1)
        assert await store.get("cb:b", "k") == Item("k", b"from b", 1)
        assert await store.delete("cb:a", "k") is True
        assert await store.get("cb:b", "k") == Item("k", b"from b", 1)
        assert await store.get("cb:other", "k") is None

    async def test_namespace_that_prefixes_another_does_not_see_its_keys(self, store: Store) -> None:
        await store.set("cb:a", "x", b"1")
        await store.set("cb:ab", "x", b"2")
        await store.set("cb:a:b", "x", b"3")
        assert [i.value for i in await store.list("cb:a")] == [b"1"]
        assert [i.value for i in await store.list("cb:ab")] == [b"2"]
        assert [i.value for i in await store.list("cb:a:b")] == [b"3"]

    async def test_separator_characters_cannot_join_namespace_and_key(self, store: Store) -> None:
        # A store that concatenates namespace and key must not make these one key.
        pairs = [("x", ":y"), ("x:", "y"), ("x/", "y"), ("x", "/y"), ("x", "\x00y"), ("x:y", "z"), ("x", "y:z")]
        for n, (namespace, key) in enumerate(pairs, start=1):
            await store.set(namespace, key, str(n).encode())
        for n, (namespace, key) in enumerate(pairs, start=1):
            assert await store.get(namespace, key) == Item(key, str(n).encode(), 1)
        for namespace in {ns for ns, _ in pairs}:
            assert [i.key for i in await store.list(namespace)] == _utf8_order(
                [k for ns, k in pairs if ns == namespace]
            )

    # ---- values and keys ----

    async def test_binary_values_round_trip(self, store: Store) -> None:
        every_byte = bytes(range(256))
        values = [every_byte, b"\x00", b"\x00\x00trailing", b"\xff\xfe not utf-8 \x80", every_byte * 4]
        for n, value in enumerate(values):
            await store.set("ns", f"k{n}", value)
        for n, value in enumerate(values):
            item = await store.get("ns", f"k{n}")
            assert item is not None
            assert item.value == value
            assert type(item.value) is bytes
        assert [i.value for i in await store.list("ns", "k")] == values

    async def test_unicode_keys_round_trip(self, store: Store) -> None:
        keys = ["ключ", "鍵", "🔑", "e\u0301", "\u00e9", "tab\tand\nnewline", "a b", "nul\x00inside", "\U0010ffff"]
        for key in keys:
            await store.set("ns", key, key.encode())
        for key in keys:
            assert await store.get("ns", key) == Item(key, key.encode(), 1)
        listed = await store.list("ns")
        assert [i.key for i in listed] == _utf8_order(keys)
        # Different code points that look alike are different keys.
        assert await store.get("ns", "e\u0301") != await store.get("ns", "\u00e9")

    async def test_unicode_namespaces(self, store: Store) -> None:
        await store.set("cb:ünïcødé", "k", b"1")
        assert await store.get("cb:ünïcødé", "k") == Item("k", b"1", 1)
        assert await store.get("cb:unicode", "k") is None

    async def test_longest_key_is_accepted(self, store: Store) -> None:
        ascii_key = "k" * MAX_KEY_BYTES
        multibyte_key = "é" * (MAX_KEY_BYTES // 2)  # two bytes each
        for key in (ascii_key, multibyte_key):
            await store.set("ns", key, b"v")
            assert await store.get("ns", key) == Item(key, b"v", 1)

    async def test_too_long_key_is_refused(self, store: Store) -> None:
        for key in ("k" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2) + "k"):
            with pytest.raises(ValueTooLargeError, match=str(MAX_KEY_BYTES)):
                await store.set("ns", key, b"v")
        assert await store.list("ns") == []

    async def test_empty_key_is_refused(self, store: Store) -> None:
        with pytest.raises(StoreError):
            await store.set("ns", "", b"v")

    async def test_value_at_the_limit_is_accepted(self, store: Store, max_value_bytes: int) -> None:
        value = random.randbytes(max_value_bytes)
        assert await store.set("ns", "big", value) == 1
        item = await store.get("ns", "big")
        assert item is not None
        assert item.value == value
        [listed] = await store.list("ns", "big")
        assert listed.value == value

    async def test_value_past_the_limit_is_refused_naming_the_limit(self, store: Store, max_value_bytes: int) -> None:
        await store.set("ns", "big", b"old")
        with pytest.raises(ValueTooLargeError, match=str(max_value_bytes)):
            await store.set("ns", "big", b"x" * (max_value_bytes + 1))
        with pytest.raises(ValueTooLargeError):
            await store.set("ns", "new", b"x" * (max_value_bytes + 1), expected_version=0)
        assert await store.get("ns", "big") == Item("big", b"old", 1)
        assert await store.get("ns", "new") is None

    # ---- list ----

    async def test_list_orders_keys_by_utf8_bytes(self, store: Store) -> None:
        # Byte order differs from locale collation ("B" < "a"), from case-folding, and
        # from UTF-16 order (U+E000 sorts before U+1F600 in UTF-8, after it in UTF-16).
        keys = ["a", "B", "b", "A", "é", "z", "\ue000", "😀", "a b", "a-b", "ab", "a\x00", "10", "9", "_x", "~"]
        for key in random.sample(keys, len(keys)):
            await store.set("ns", key, b"")
        assert [i.key for i in await store.list("ns")] == _utf8_order(keys)

    async def test_list_by_prefix(self, store: Store) -> None:
        keys = ["user/1", "user/2", "user/10", "users", "use", "other", "user", "v"]
        for key in keys:
            await store.set("ns", key, key.encode())
        assert [i.key for i in await store.list("ns", "user/")] == ["user/1", "user/10", "user/2"]
        assert [i.key for i in await store.list("ns", "user")] == ["user", "user/1", "user/10", "user/2", "users"]
        assert [i.key for i in await store.list("ns", "u")] == ["use", "user", "user/1", "user/10", "user/2", "users"]
        assert [i.key for i in await store.list("ns", "nope")] == []
        assert [i.value for i in await store.list("ns", "other")] == [b"other"]
        assert len(await store.list("ns", "")) == len(keys)

    async def test_list_prefix_has_no_wildcards(self, store: Store) -> None:
        # SQL LIKE treats % and _ as wildcards; Redis patterns treat * ? [ ] \ so.
        keys = ["50%", "50%off", "500", "a_b", "axb", "[x]", "x", "*", "*star", "star", "?", "q", "\\", "\\n", "n"]
        for key in keys:
            await store.set("ns", key, b"")
        for prefix, expected in [
            ("50%", ["50%", "50%off"]),
            ("a_", ["a_b"]),
            ("[", ["[x]"]),
            ("*", ["*", "*star"]),
            ("?", ["?"]),
            ("\\", ["\\", "\\n"]),
        ]:
            assert [i.key for i in await store.list("ns", prefix)] == expected, prefix

    async def test_list_prefix_at_code_point_edges(self, store: Store) -> None:
        keys = ["a\U0010ffff", "a\U0010ffffz", "a\U0010fffe", "b", "a\x7f", "a\x7fz", "a\x80", "a\uffff", "a\U00010000"]
        for key in keys:
            await store.set("ns", key, b"")
        assert [i.key for i in await store.list("ns", "a\U0010ffff")] == ["a\U0010ffff", "a\U0010ffffz"]
        assert [i.key for i in await store.list("ns", "a\x7f")] == ["a\x7f", "a\x7fz"]
        assert [i.key for i in await store.list("ns", "a\uffff")] == ["a\uffff"]
        assert [i.key for i in await store.list("ns", "a")] == _utf8_order([k for k in keys if k != "b"])

    async def test_list_pages(self, store: Store) -> None:
        keys = [f"item/{n:03d}" for n in range(25)]
        for key in random.sample(keys, len(keys)):
            await store.set("ns", key, key.encode())
        await store.set("ns", "other", b"")
        pages: list[list[str]] = []
        after = ""
        while True:
            page = await store.list("ns", "item/", start_after=after, limit=10)
            if not page:
                break
            pages.append([i.key for i in page])
            after = page[-1].key
        assert [len(p) for p in pages] == [10, 10, 5]
        assert [k for p in pages for k in p] == keys

    async def test_list_start_after_need_not_be_a_key(self, store: Store) -> None:
        for key in ["a1", "a3", "a5"]:
            await store.set("ns", key, b"")
        assert [i.key for i in await store.list("ns", "a", start_after="a2")] == ["a3", "a5"]
        assert [i.key for i in await store.list("ns", "a", start_after="a")] == ["a1", "a3", "a5"]
        assert [i.key for i in await store.list("ns", "a", start_after="0")] == ["a1", "a3", "a5"]
        assert [i.key for i in await store.list("ns", "a", start_after="a5")] == []
        assert [i.key for i in await store.list("ns", "a", start_after="b")] == []
        assert [i.key for i in await store.list("ns", start_after="a1")] == ["a3", "a5"]

    async def test_list_limit(self, store: Store) -> None:
        for n in range(5):
            await store.set("ns", f"k{n}", b"")
        assert [i.key for i in await store.list("ns", limit=1)] == ["k0"]
        assert [i.key for i in await store.list("ns", limit=3)] == ["k0", "k1", "k2"]
        assert len(await store.list("ns", limit=1000)) == 5
        assert len(await store.list("ns")) == 5

    async def test_list_default_limit_is_100(self, store: Store) -> None:
        for n in range(105):
            await store.set("ns", f"k{n:03d}", b"")
        assert len(await store.list("ns")) == 100

    async def test_list_returns_values_and_versions(self, store: Store) -> None:
        await store.set("ns", "a", b"1")
        await store.set("ns", "b", b"2")
        await store.set("ns", "b", b"22")
        assert await store.list("ns") == [Item("a", b"1", 1), Item("b", b"22", 2)]

    async def test_list_keys_only(self, store: Store) -> None:
        await store.set("ns", "a", b"1")
        await store.set("ns", "b", b"2")
        await store.set("ns", "b", b"22")
        assert await store.list("ns", keys_only=True) == [Item("a", b"", 1), Item("b", b"", 2)]

    async def test_list_sees_deletes(self, store: Store) -> None:
        for key in ["a", "b", "c"]:
            await store.set("ns", key, b"")
        await store.delete("ns", "b")
        assert [i.key for i in await store.list("ns")] == ["a", "c"]

    # ---- concurrency ----

    async def test_concurrent_cas_increments_are_exact(self, store: Store) -> None:
        tasks, per_task = 50, 4
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):

                async def worker() -> None:
                    for _ in range(per_task):
                        await cas_increment(store, "ns", "counter")

                nursery.start_soon(worker)
        item = await store.get("ns", "counter")
        assert item is not None
        assert int(item.value) == tasks * per_task
        assert item.version == tasks * per_task

    async def test_concurrent_creates_have_one_winner(self, store: Store) -> None:
        winners: list[int] = []
        conflicts: list[int] = []

        async def create(n: int) -> None:
            try:
                await store.set("ns", "once", str(n).encode(), expected_version=0)
                winners.append(n)
            except VersionConflictError as e:
                conflicts.append(e.current)

        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(create, n)
        assert len(winners) == 1
        assert conflicts == [1] * 29
        assert await store.get("ns", "once") == Item("once", str(winners[0]).encode(), 1)

    async def test_concurrent_unconditional_writes_each_get_their_own_version(self, store: Store) -> None:
        versions: list[int] = []

        async def write(n: int) -> None:
            versions.append(await store.set("ns", "k", str(n).encode()))

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(write, n)
        assert sorted(versions) == list(range(1, 51))
        item = await store.get("ns", "k")
        assert item is not None
        assert item.version == 50

    async def test_concurrent_writes_to_many_keys(self, store: Store) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(store.set, f"cb:{n % 4}", f"k{n:03d}", str(n).encode())
        for ns in range(4):
            items = await _list_all(store, f"cb:{ns}", page=7)
            assert [i.key for i in items] == [f"k{n:03d}" for n in range(ns, 100, 4)]
            assert all(i.value == str(int(i.key[1:])).encode() for i in items)

    # ---- quotas (enforced over every store by QuotaStore) ----

    async def test_quota_on_number_of_keys(self, store: Store) -> None:
        quotas = QuotaStore.for_callbacks(store, QuotaConfig(max_keys=3, max_bytes=None))
        for key in ["a", "b", "c"]:
            await quotas.set("cb:q", key, b"v")
        with pytest.raises(QuotaExceededError, match="max_keys quota is 3") as info:
            await quotas.set("cb:q", "d", b"v")
        assert (info.value.quota, info.value.limit, info.value.namespace) == ("max_keys", 3, "cb:q")
        assert await store.get("cb:q", "d") is None
        # Overwriting an existing key adds no key.
        assert await quotas.set("cb:q", "a", b"new") == 2
        # Deleting makes room.
        assert await quotas.delete("cb:q", "b") is True
        await quotas.set("cb:q", "d", b"v")
        assert await quotas.usage("cb:q") == (3, 4 + 2 + 2)
        # Other callbacks and the bot's own namespace have their own (or no) quota.
        for key in ["a", "b", "c", "d", "e"]:
            await quotas.set("bot", key, b"v")
        for key in ["a", "b", "c"]:
            await quotas.set("cb:other", key, b"v")
        with pytest.raises(QuotaExceededError):
            await quotas.set("cb:other", "d", b"v")

    async def test_quota_on_bytes(self, store: Store) -> None:
        quotas = QuotaStore.for_callbacks(store, QuotaConfig(max_keys=None, max_bytes=100))
        await quotas.set("cb:q", "k1", b"x" * 48)  # 50 bytes with its key
        await quotas.set("cb:q", "k2", b"x" * 48)  # 100
        with pytest.raises(QuotaExceededError, match="max_bytes quota is 100") as info:
            await quotas.set("cb:q", "k3", b"")
        assert info.value.quota == "max_bytes"
        with pytest.raises(QuotaExceededError):
            await quotas.set("cb:q", "k1", b"x" * 49)
        # A write that shrinks usage is allowed, and frees room.
        await quotas.set("cb:q", "k1", b"x" * 8)
        await quotas.set("cb:q", "k3", b"x" * 38)
        assert await quotas.usage("cb:q") == (3, 100)

    async def test_quota_counts_what_was_stored_before(self, store: Store) -> None:
        for n in range(5):
            await store.set("cb:q", f"old{n}", b"12345")
        quotas = QuotaStore.for_callbacks(store, None, {"q": QuotaConfig(max_keys=6, max_bytes=None)})
        await quotas.set("cb:q", "new", b"")
        with pytest.raises(QuotaExceededError):
            await quotas.set("cb:q", "newer", b"")
        assert await quotas.usage("cb:q") == (6, 5 * 9 + 3)

    async def test_quota_keeps_compare_and_set(self, store: Store) -> None:
        quotas = QuotaStore.for_callbacks(store, QuotaConfig(max_keys=10))
        assert await quotas.set("cb:q", "k", b"a", expected_version=0) == 1
        await _conflicts(quotas.set("cb:q", "k", b"b", expected_version=0), current=1)
        await _conflicts(quotas.delete("cb:q", "k", expected_version=5), current=1)
        assert await quotas.delete("cb:q", "missing") is False
        assert await quotas.delete("cb:q", "k", expected_version=1) is True
        assert await quotas.usage("cb:q") == (0, 0)

    async def test_quota_holds_under_concurrent_writers(self, store: Store) -> None:
        quotas = QuotaStore.for_callbacks(store, QuotaConfig(max_keys=10, max_bytes=None))
        refused: list[str] = []

        async def write(n: int) -> None:
            try:
                await quotas.set("cb:q", f"k{n:02d}", b"v")
            except QuotaExceededError:
                refused.append(f"k{n:02d}")

        async with trio.open_nursery() as nursery:
            for n in range(25):
                nursery.start_soon(write, n)
        assert len(refused) == 15
        assert len(await store.list("cb:q")) == 10


# ---- the store behind a real bot, through the Storage RPC ----


@asynccontextmanager
async def running_oco(config: str, workdir: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """Run ``oco run`` as a separate process with the YAML ``config``; yield the process
    and its gRPC address once it listens. Its log goes to ``workdir/oco-<n>.log``."""
    run_id = uuid.uuid4().hex[:6]
    address_file = workdir / f"address-{run_id}"
    config_file = workdir / f"oco-{run_id}.yaml"
    config_file.write_text(config)
    log = (workdir / f"oco-{run_id}.log").open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "oco_core", "run", "--config", str(config_file), "--address-file", str(address_file)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        address = await _wait_for_file(address_file, process, 60)
        if address is None:
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            why = (
                f"exited with {process.returncode}" if process.returncode is not None else "did not listen within 60 s"
            )
            raise RuntimeError(f"oco run {why}; the end of {log.name}:\n{tail}")
        yield process, address
    finally:
        try:
            # Shielded: the caller may be leaving because it was cancelled.
            with trio.CancelScope(shield=True):
                if process.poll() is None:
                    process.terminate()
                    with trio.move_on_after(10) as waited:
                        await process.wait()
                    if waited.cancelled_caught:
                        process.kill()
                        await process.wait()
        finally:
            log.close()


class _BlockingStorageClient:
    """The Storage service through grpcio's blocking client, for use in worker threads."""

    def __init__(self, address: str, secret: str) -> None:
        import grpc

        from .._proto import storage_pb2_grpc

        self._channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self._channel).result(timeout=30)
        self._stub = storage_pb2_grpc.StorageStub(self._channel)
        self._metadata = (("authorization", f"Bearer {secret}"),)

    def set(self, key: str, value: bytes) -> bool:
        """Write; True once acknowledged, False when the call failed."""
        import grpc

        from .._proto import storage_pb2

        try:
            self._stub.Set(storage_pb2.SetRequest(key=key, value=value), metadata=self._metadata, timeout=30)
        except grpc.RpcError:
            return False
        return True

    def increment(self, key: str) -> bool:
        """Add one to a decimal counter with compare-and-set; False when a call failed."""
        import grpc

        from .._proto import storage_pb2

        backoff = cas_backoff()
        try:
            while True:
                got = self._stub.Get(storage_pb2.GetRequest(key=key), metadata=self._metadata, timeout=30)
                request = storage_pb2.SetRequest(
                    key=key, value=str(int(got.value or b"0") + 1).encode(), expected_version=got.version
                )
                try:
                    self._stub.Set(request, metadata=self._metadata, timeout=30)
                    return True
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.ABORTED:
                        raise
                time.sleep(backoff.next_delay())
        except grpc.RpcError:
            return False

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def _config(store_section: str, callbacks: Sequence[tuple[str, str]], routes: str = "") -> str:
    entries = "\n".join(f"  - {{id: {cid}, secret: {secret}}}" for cid, secret in callbacks)
    # Port 0: a free port each run, so tests never meet another bot on the default one.
    return (
        f"adapters: [{{type: memory}}]\nstore: {store_section}\ngrpc: {{listen: '127.0.0.1:0'}}\n"
        f"log_level: INFO\ncallbacks:\n{entries}\n{routes}"
    )


class StorageServiceContract:
    """The store behind a real bot, through the Storage RPC and the Python SDK.

    Subclasses provide the fixture ``store_section``: the ``store:`` value of the bot's
    config as one YAML flow mapping (``{url: "sqlite:///..."}``), the same on every call
    within a test so that a restarted bot finds its data. Stores with a server add
    :class:`ServerOutageContract`.
    """

    async def test_acknowledged_writes_survive_sigkill(self, store_section: str, tmp_path: Path) -> None:
        from .. import Callback

        secret = secrets.token_urlsafe(24)
        config = _config(store_section, [("writer", secret)])
        acknowledged: dict[str, bytes] = {}
        increments = 0
        writers = 10
        async with running_oco(config, tmp_path) as (process, address):
            # A plain generated client, one blocking call per thread: a write counts as
            # acknowledged exactly when its Set call returned OK.
            client = _BlockingStorageClient(address, secret)
            limiter = trio.CapacityLimiter(writers)

            async def write(task: int) -> None:
                nonlocal increments
                for n in range(1_000_000):
                    key = f"w{task:02d}/{n:07d}"
                    value = f"{key}:".encode() * 20
                    if not await trio.to_thread.run_sync(client.set, key, value, limiter=limiter):
                        return
                    acknowledged[key] = value
                    if n % 5 == 0:
                        if not await trio.to_thread.run_sync(client.increment, "counter", limiter=limiter):
                            return
                        increments += 1

            try:
                async with trio.open_nursery() as nursery:
                    for task in range(writers):
                        nursery.start_soon(write, task)
                    # Kill at a random moment once writing is well under way; the
                    # writers stop at their first failed call.
                    while len(acknowledged) < 100:
                        await trio.sleep(0.01)
                    await trio.sleep(random.uniform(0, 1.0))
                    os.kill(process.pid, signal.SIGKILL)
                    await process.wait()
            finally:
                client.close()
        acknowledged_count, increments_acknowledged = len(acknowledged), increments
        assert acknowledged_count >= 100

        async with running_oco(config, tmp_path) as (_, address), trio.open_nursery() as nursery:
            callback = Callback(id="writer", secret=secret, address=address)
            await nursery.start(callback.serve)
            stored = {item.key: item.value async for item in callback.storage.items("w", page=1000)}
            missing = sorted(set(acknowledged) - set(stored))
            assert not missing, f"{len(missing)} of {acknowledged_count} acknowledged writes lost, e.g. {missing[:5]}"
            assert all(stored[key] == value for key, value in acknowledged.items())
            counter = int(await callback.storage.get("counter") or b"0")
            # At least every acknowledged increment; at most one more per writer in flight.
            assert increments_acknowledged <= counter <= increments_acknowledged + writers
            nursery.cancel_scope.cancel()

    async def test_fifty_callbacks_increment_one_counter_exactly(self, store_section: str, tmp_path: Path) -> None:
        from .. import Callback, VersionConflictError

        secret = secrets.token_urlsafe(24)
        replicas, per_replica = 50, 2
        config = _config(store_section, [("counter", secret)])
        async with running_oco(config, tmp_path) as (_, address), trio.open_nursery() as nursery:
            # 50 replicas of one callback, each its own connection: one namespace, one key.
            callbacks = [Callback(id="counter", secret=secret, address=address) for _ in range(replicas)]
            for callback in callbacks:
                await nursery.start(callback.serve)

            async def increment(callback: Callback) -> None:
                for _ in range(per_replica):
                    backoff = cas_backoff(0.01)
                    while True:
                        item = await callback.storage.get_item("hits")
                        count, version = (0, 0) if item is None else (int(item.value), item.version)
                        try:
                            await callback.storage.set("hits", str(count + 1).encode(), expected_version=version)
                            break
                        except VersionConflictError:
                            await backoff.sleep()

            async with trio.open_nursery() as workers:
                for callback in callbacks:
                    workers.start_soon(increment, callback)
            item = await callbacks[0].storage.get_item("hits")
            assert item is not None
            assert int(item.value) == replicas * per_replica
            assert item.version == replicas * per_replica
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _behind_proxy(
    server: tuple[str, int, Callable[[str, int], str]], callback_id: str
) -> AsyncIterator[tuple[TcpProxy, str, str]]:
    """A running :class:`TcpProxy` in front of the store's ``server``; yields it, a bot
    config whose store is reached through it with one callback, ``callback_id``, and that
    callback's secret."""
    host, port, section_at = server
    secret = secrets.token_urlsafe(24)
    proxy = TcpProxy(host, port)
    async with trio.open_nursery() as proxying:
        await proxying.start(proxy.run)
        yield proxy, _config(section_at("127.0.0.1", proxy.port), [(callback_id, secret)]), secret
        proxying.cancel_scope.cancel()


class ServerOutageContract:
    """What a store with a database server must survive: the server going away while the
    bot runs, and being away when it starts. A serverless store (SQLite) has no server to
    lose and does not take these tests at all.

    Subclasses provide ``store_section`` (as for :class:`StorageServiceContract`) and
    ``store_server`` returning ``(host, port, section_at)``, where ``section_at(host,
    port)`` is the ``store:`` value reaching the same database at another address (the
    tests put a :class:`TcpProxy` there).
    """

    @pytest.fixture
    def server(
        self, store_server: tuple[str, int, Callable[[str, int], str]]
    ) -> tuple[str, int, Callable[[str, int], str]]:
        """The store's server (provided by the subclass as ``store_server``)."""
        return store_server

    async def test_outage_answers_unavailable_chat_goes_on_and_store_heals(
        self, server: tuple[str, int, Callable[[str, int], str]]
    ) -> None:
        from .. import Callback, Message, StoreUnavailableError
        from . import open_bot

        async with _behind_proxy(server, "outage") as (proxy, config, secret):
            async with open_bot(config) as running, trio.open_nursery() as nursery:
                callback = Callback(id="outage", secret=secret, address=running.address)

                @callback.respond(r"^ping$")
                async def ping(message: Message) -> None:
                    await message.reply("PONG")

                await nursery.start(callback.serve)
                assert await callback.storage.set("k", b"before") == 1

                proxy.cut()
                with pytest.raises(StoreUnavailableError, match="unavailable") as info:
                    await callback.storage.set("k", b"during")
                # The store's own words cross the wire, naming the database it cannot reach.
                assert "127.0.0.1" in str(info.value)
                with pytest.raises(StoreUnavailableError):
                    await callback.storage.get("k")
                # Chat does not need the store.
                with trio.fail_after(30):
                    await running.adapter.inject("oco ping")
                    reply = await running.adapter.next_sent()
                assert reply.body.endswith("PONG")

                proxy.restore()
                with trio.fail_after(60):
                    while True:
                        try:
                            version = await callback.storage.set("k", b"after")
                            break
                        except StoreUnavailableError:
                            await trio.sleep(0.2)
                assert version in (2, 3)  # 3 when the write during the outage had landed
                assert await callback.storage.get("k") == b"after"
                # Stop the callback before the bot, so that it does not see the bot go.
                nursery.cancel_scope.cancel()

    #: Options added to the ``store:`` section for the hang test: the store's own
    #: timeouts, short (``"socket_timeout: 1"``); and the seconds past which a call to a
    #: hung server counts as hanging. Subclasses set both.
    hang_options: str = ""
    hang_within: float = 0.0

    async def test_a_hung_server_makes_calls_unavailable_promptly_and_the_store_heals(
        self, server: tuple[str, int, Callable[[str, int], str]]
    ) -> None:
        """A server that accepts connections and never answers (a hang, a network that
        drops packets; TCP keepalives do not notice) fails each call with UNAVAILABLE
        within the store's timeouts, well before the SDK's own 30 s deadline."""
        from .. import Callback, StoreUnavailableError
        from . import open_bot

        assert self.hang_options, f"{type(self).__name__} sets hang_options and hang_within"
        host, port, section_at = server
        hung = (host, port, lambda at, port: section_at(at, port).removesuffix("}") + f", {self.hang_options}}}")
        async with _behind_proxy(hung, "hung") as (proxy, config, secret):
            async with open_bot(config) as running, trio.open_nursery() as nursery:
                callback = Callback(id="hung", secret=secret, address=running.address)
                await nursery.start(callback.serve)
                assert await callback.storage.set("k", b"v") == 1

                proxy.freeze()
                began = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    await callback.storage.get("k")
                took = time.monotonic() - began
                assert took < self.hang_within, f"a call to the hung server took {took:.1f} s"

                proxy.restore()
                with trio.fail_after(30):
                    while True:
                        try:
                            assert await callback.storage.get("k") == b"v"
                            break
                        except StoreUnavailableError:
                            await trio.sleep(0.1)
                nursery.cancel_scope.cancel()

    async def test_unreachable_at_start_is_one_line_then_retried(
        self, server: tuple[str, int, Callable[[str, int], str]], tmp_path: Path
    ) -> None:
        from .. import Callback

        async with _behind_proxy(server, "late") as (proxy, config, secret):
            proxy.cut()
            ready: list[str] = []

            async def run_bot() -> None:
                async with running_oco(config, tmp_path) as (_, address):
                    ready.append(address)
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_bot)
                # Wait for the bot to say, in one line, which store it cannot reach.
                lines: list[str] = []
                with trio.move_on_after(30):
                    while True:
                        logs = [p.read_text(errors="replace") for p in tmp_path.glob("oco-*.log")]
                        lines = [line for text in logs for line in text.splitlines() if "unavailable" in line]
                        if lines:
                            break
                        await trio.sleep(0.1)
                assert lines, f"no 'unavailable' line in the bot's log within 30 s: {logs}"
                assert f"127.0.0.1:{proxy.port}" in lines[0]
                assert not ready, "the bot said it was ready without its store"
                proxy.restore()
                with trio.fail_after(60):
                    while not ready:
                        await trio.sleep(0.1)
                async with trio.open_nursery() as client:
                    callback = Callback(id="late", secret=secret, address=ready[0])
                    await client.start(callback.serve)
                    assert await callback.storage.set("k", b"v") == 1
                    client.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
