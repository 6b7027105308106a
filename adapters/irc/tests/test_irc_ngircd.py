"""The adapter against a real ngircd, with a raw IRC connection playing the person: what
is particular to IRC. What every adapter must do is checked by the adapter contract, in
test_irc_contract.py (messages both ways, mentions, splitting, membership, outages)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from oco_adapter_irc import IrcAdapter

from oco_core import AdapterError
from oco_core.plugin import ChatUser, MembershipKind, OutgoingMessage

pytestmark = pytest.mark.server("ngircd")

CHANNEL = "#test"


async def test_users_actions_and_wire_format(kit: Any) -> None:
    # What the contract (test_irc_contract.py) checks in general, here as IRC spells it.
    host = kit.host
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, host):
            await alice.expect(r":oco!\S+ JOIN :?#test")
            assert host.own_names == ["oco"]

            await alice.say(CHANNEL, "oco: ping")
            message = await host.next_message(lambda m: m.body == "oco: ping")
            assert message.user == ChatUser(id="alice", name="alice", mention_name="alice")
            await adapter.send(OutgoingMessage(body="PONG", room_id="#test", user=message.user, mention=True))
            await alice.expect(r":oco!\S+ PRIVMSG #test :alice: PONG$")
            await adapter.send(OutgoingMessage(body="just for you", user=message.user, private=True))
            await alice.expect(r":oco!\S+ PRIVMSG alice :just for you$")

            # CTCP ACTION (/me) both ways.
            await alice.say(CHANNEL, "\x01ACTION waves\x01")
            action = await host.next_message(lambda m: m.action)
            assert action.body == "waves"
            assert action.room is not None
            await adapter.send(OutgoingMessage(body="waves back", room_id="#test", action=True))
            await alice.expect(r"PRIVMSG #test :\x01ACTION waves back\x01$")


async def test_user_ids_are_case_folded_nicks(kit: Any) -> None:
    async with kit.person("Bob[1]") as bob:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await bob.expect(r":oco!\S+ JOIN")
            await bob.say("#TEST", "hi")
            message = await kit.host.next_message()
            assert message.user.id == "bob[1]"  # ngircd says CASEMAPPING=ascii: [ ] stay
            assert message.user.mention_name == "Bob[1]"
            assert message.room is not None
            assert message.room.id == "#test"
            # A reply addressed by the folded id reaches the same person.
            await adapter.send(OutgoingMessage(body="hey", user=ChatUser(id=message.user.id), private=True))
            await bob.expect(r"PRIVMSG Bob\[1\] :hey$")


async def test_long_and_multiline_messages_are_split_within_512_bytes(kit: Any) -> None:
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
            since = alice.mark()
            word = "é漢🙂x" * 150  # no spaces: split inside the text, on character boundaries
            await adapter.send(OutgoingMessage(body=word + "\nsecond line\n\nthird", room_id="#test"))
            await alice.expect(r"PRIVMSG #test :third$")
            raw = [r for r in alice.raw[since:] if b" PRIVMSG #test :" in r]
            assert all(len(line) + 2 <= 512 for line in raw)
            texts = [line.split(b" :", 1)[1].decode("utf-8") for line in raw]  # each piece valid UTF-8
            assert texts[-2:] == ["second line", "third"]
            assert "".join(texts[:-2]) == word
            assert len(texts) > 3


async def test_flood_of_fifty_lines_arrives_in_order_without_disconnect(kit: Any) -> None:
    # ngircd runs with its default penalties (about three lines a second); the bot's
    # bucket is set a little under that, as an operator would for their network.
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config(rate_limit={"burst": 5, "per_second": 2.5}))
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
            since = alice.mark()
            for n in range(50):
                await adapter.send(OutgoingMessage(body=f"line {n}", room_id="#test"))
            await alice.expect(r"PRIVMSG #test :line 49$", timeout=60)
            got = [m.group(1) for m in alice.find(r"PRIVMSG #test :line (\d+)$", since)]
            assert got == [str(n) for n in range(50)]
            stats = adapter.statistics()
            assert stats.connected
            assert stats.registrations == 1
            assert stats.sent_lines >= 50
            assert not alice.find(r"oco\S* QUIT", since)


async def test_dead_connection_is_detected_and_replaced(kit: Any, gate: Any) -> None:
    adapter = IrcAdapter(kit.config(port=gate.port, ping_interval=0.3, ping_timeout=0.5))
    async with kit.person("alice") as alice, kit.running(adapter, kit.host):
        await alice.expect(r":oco!\S+ JOIN")
        await kit.wait_for(lambda: adapter.connected, "connected, as the bot's health reads it")
        gate.frozen = True  # the TCP connection stays open, but nothing flows
        await kit.wait_for(lambda: not adapter.statistics().connected, "the keepalive to give up")
        assert not adapter.connected
        gate.frozen = False
        await kit.wait_for(lambda: adapter.statistics().registrations == 2, "the bot to reconnect")
        await kit.wait_for(lambda: adapter.connected, "connected again")
        await alice.expect(r":oco\S* JOIN :?#test")


async def test_nick_collision_falls_back_and_regains_the_nick(kit: Any) -> None:
    # The squatter shares the channel, so the bot sees its NICK and need not wait.
    async with kit.person("oco") as squatter:
        adapter = IrcAdapter(kit.config(alt_nicks=["oco_alt"], regain_nick_interval=600))
        async with kit.running(adapter, kit.host):
            assert adapter.statistics().nick == "oco_alt"
            assert kit.host.own_names == ["oco_alt"]
            await squatter.expect(r":oco_alt!\S+ JOIN")
            # The holder changes nick: the bot takes its own back at once.
            await squatter.send("NICK squatter")
            await kit.wait_for(lambda: adapter.statistics().nick == "oco", "the bot to regain its nick")
            assert kit.host.own_names == ["oco"]


async def test_nick_regained_periodically(kit: Any) -> None:
    async with kit.person("oco", channels=()) as squatter:
        adapter = IrcAdapter(kit.config(regain_nick_interval=0.3))
        async with kit.running(adapter, kit.host):
            assert adapter.statistics().nick == "oco_"  # no alternatives: an underscore
            await squatter.send("QUIT :bye")
            await kit.wait_for(lambda: adapter.statistics().nick == "oco", "the bot to regain its nick")


async def test_kick_is_reported_and_the_bot_rejoins(kit: Any) -> None:
    host = kit.host
    async with kit.person("alice") as alice:  # first in the channel: a channel operator
        adapter = IrcAdapter(kit.config(rejoin_delay=0.2))
        async with kit.running(adapter, host):
            await alice.expect(r":oco!\S+ JOIN")
            await alice.send("KICK #test oco :out")
            kick = await host.next_membership(lambda e: e.kind is MembershipKind.KICKED, what="the KICK")
            assert kick.user.id == "oco"
            assert kick.actor is not None
            assert kick.actor.id == "alice"
            assert kick.reason == "out"
            assert kick.room.id == "#test"
            await alice.expect(r":oco!\S+ JOIN :?#test")
            await kit.wait_for(lambda: any(r.id == "#test" for r in adapter.rooms()), "the rejoin")


async def test_membership_events_and_directory(kit: Any) -> None:
    host = kit.host
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, host):
            await alice.expect(r":oco!\S+ JOIN")
            await kit.wait_for(lambda: {u.id for u in adapter.members("#test")} == {"alice", "oco"}, "NAMES")

            def seen(kind: MembershipKind, user: str) -> bool:
                return any(e.kind is kind and e.user.id == user and e.room.id == "#test" for e in host.memberships)

            async with kit.person("carol"):
                await kit.wait_for(lambda: seen(MembershipKind.JOINED, "carol"), "carol's JOIN")
                assert "carol" in {u.id for u in adapter.members("#test")}
            await kit.wait_for(lambda: seen(MembershipKind.LEFT, "carol"), "carol's QUIT")
            assert "carol" not in {u.id for u in adapter.members("#test")}

            await alice.send("NICK alicia")
            await kit.wait_for(lambda: seen(MembershipKind.RENAMED, "alicia"), "the nick change")
            (renamed,) = [e for e in host.memberships if e.kind is MembershipKind.RENAMED]
            assert renamed.previous is not None
            assert renamed.previous.id == "alice"
            assert not seen(MembershipKind.LEFT, "alice")  # a rename, not a departure
            assert {u.id for u in adapter.members("#test")} == {"alicia", "oco"}

            await alice.send("TOPIC #test :deploys on fridays")
            await kit.wait_for(lambda: host.topics, "the topic change")
            room, setter = host.topics[-1]
            assert room.topic == "deploys on fridays"
            assert setter is not None
            assert setter.id == "alicia"

            await alice.send("PART #test :later")
            await kit.wait_for(lambda: seen(MembershipKind.LEFT, "alicia"), "the PART")
            assert {u.id for u in adapter.members("#test")} == {"oco"}


async def test_join_and_part_on_request(kit: Any) -> None:
    async with kit.person("alice", channels=("#test", "#other")) as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await alice.send("INVITE oco #other")
            invite = await kit.host.next_membership(lambda e: e.kind is MembershipKind.INVITED, what="the INVITE")
            assert invite.room.id == "#other"
            assert invite.actor is not None
            assert invite.actor.id == "alice"
            await adapter.join("#other")
            await alice.expect(r":oco!\S+ JOIN :?#other")
            await adapter.send(OutgoingMessage(body="hello other", room_id="#other"))
            await adapter.part("#other")
            await alice.expect(r"PRIVMSG #other :hello other$")
            await alice.expect(r":oco!\S+ PART #other")


async def test_bad_input_is_skipped(kit: Any) -> None:
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
            await alice.send(b"PRIVMSG #test :caf\xe9 in latin-1")  # not UTF-8
            await alice.send("PRIVMSG #test :\x01VERSION\x01")  # CTCP request: answered, not routed
            await alice.send("PRIVMSG #test :\x01ACTION\x01")  # an empty action
            await alice.send("PRIVMSG #test :\x02\x0304,05\x0f")  # only formatting codes
            await alice.send("NOTICE #test :a notice is never routed")
            await alice.say(CHANNEL, "still alive")
            await kit.host.next_message(lambda m: m.body == "still alive")
            bodies = [m.body for m in kit.host.messages]
            assert "café in latin-1" in bodies
            assert not any("VERSION" in b or "notice" in b for b in bodies)
            await alice.expect(r"NOTICE alice :\x01VERSION ")
            assert adapter.statistics().registrations == 1


async def test_bot_quits_when_cancelled(kit: Any) -> None:
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
        await alice.expect(r":oco!\S+ QUIT :")


async def test_messages_sent_before_registration_wait_for_it(kit: Any) -> None:
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config())
        await adapter.send(OutgoingMessage(body="early bird", room_id="#test"))
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
            await alice.expect(r"PRIVMSG #test :early bird$")


async def test_server_password(kit: Any, make_ngircd: Any) -> None:
    server = await make_ngircd(password="letmein")
    adapter = IrcAdapter(kit.config(port=server.port, password="letmein"))
    async with kit.running(adapter, kit.host):
        assert adapter.statistics().connected


async def test_wrong_server_password_is_a_clear_error_before_start(kit: Any, make_ngircd: Any) -> None:
    server = await make_ngircd(password="letmein")
    adapter = IrcAdapter(kit.config(port=server.port, password="wrong"))
    refused = pytest.RaisesExc(AdapterError, match="refused the bot: server password refused")
    with pytest.RaisesGroup(refused) as caught:
        async with kit.running(adapter, kit.host):
            pass
    assert "wrong" not in str(caught.value.exceptions[0])


async def test_tls_with_a_private_ca(kit: Any, make_ngircd: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(ca_file))
    server = await make_ngircd(tls_cert=(cert, key))

    adapter = IrcAdapter(kit.config(port=server.tls_port, tls=True, tls_ca_file=str(ca_file)))
    async with kit.person("alice", port=server.port) as alice, kit.running(adapter, kit.host):
        await alice.expect(r":oco!\S+ JOIN :?#test")
        await alice.say(CHANNEL, "oco: over tls")
        await kit.host.next_message(lambda m: m.body == "oco: over tls")
        await adapter.send(OutgoingMessage(body="secure", room_id="#test"))
        await alice.expect(r"PRIVMSG #test :secure$")

    # Without the CA the certificate cannot be verified: a config error, said so.
    untrusting = IrcAdapter(kit.config(port=server.tls_port, tls=True))
    with pytest.RaisesGroup(pytest.RaisesExc(AdapterError, match="failed verification")):
        async with kit.running(untrusting, kit.host):
            pass


async def test_server_pings_are_answered(kit: Any, make_ngircd: Any, caplog: pytest.LogCaptureFixture) -> None:
    # ngircd pings a silent client after PingTimeout (at least 5 s) and drops it when no
    # PONG comes within PongTimeout; the bot's own keepalive is set long, so only its
    # answers keep it connected.
    caplog.set_level(logging.DEBUG, logger="oco_adapter_irc")
    server = await make_ngircd(ping_timeout=5, pong_timeout=1)
    adapter = IrcAdapter(kit.config(port=server.port, ping_interval=600))
    async with kit.running(adapter, kit.host):

        def ponged() -> bool:
            return any(r.getMessage().startswith(">> PONG") for r in caplog.records)

        await kit.wait_for(ponged, "ngircd's PING and the bot's PONG", timeout=30)
        await trio.sleep(2)  # past PongTimeout: a bot that had not answered would be gone
        stats = adapter.statistics()
        assert stats.connected
        assert stats.registrations == 1


async def test_joins_a_channel_with_a_key(kit: Any) -> None:
    async with kit.person("alice", channels=("#secret",)) as alice:
        await alice.send("MODE #secret +k sesame")
        await alice.expect(r"MODE #secret \+k")
        adapter = IrcAdapter(kit.config(channels=[{"name": "#secret", "key": "sesame"}]))
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN :?#secret")


async def test_lines_the_server_never_confirmed_go_out_again_after_a_reconnect(kit: Any, gate: Any) -> None:
    """Lines written into a connection that dies with them in flight (here: held by a
    frozen relay that then drops the connection, as a server that hangs with a backlog and
    dies) are not lost: the server never answered the PING that followed them, so they
    are sent again on the next connection."""
    adapter = IrcAdapter(kit.config(port=gate.port, rate_limit={"burst": 50, "per_second": 200}))
    async with kit.person("alice") as alice, kit.running(adapter, kit.host):
        await alice.expect(r":oco!\S+ JOIN")
        since = alice.mark()
        gate.frozen = True
        for n in range(30):
            await adapter.send(OutgoingMessage(body=f"backlog {n}", room_id="#test"))
        await kit.wait_for(lambda: adapter.statistics().queued_lines == 0, "every line to be written")
        assert adapter.statistics().unconfirmed_lines == 30
        gate.drop()
        gate.frozen = False
        await kit.wait_for(lambda: adapter.statistics().registrations == 2, "the bot to reconnect")
        await alice.expect(r"PRIVMSG #test :backlog 29$", since=since)
        seen = [int(m.group(1)) for m in alice.find(r"PRIVMSG #test :backlog (\d+)$", since)]
        assert seen == list(range(30)), seen  # the relay lost them all: each came once, in order
        assert adapter.statistics().resent_lines == 30
        await kit.wait_for(lambda: adapter.statistics().unconfirmed_lines == 0, "the server to confirm them")
