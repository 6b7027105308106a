"""The commands the bot answers itself, before any route: help, and managing roles and
linked identities (``grant``, ``revoke``, ``roles``, ``who can``, ``link``, ``unlink``).

They are answered in the room the person wrote in, and every change is recorded in the
audit log. Routes declared by callbacks never see these messages, except ``link`` when
it does not name an account on one of the bot's adapters (a link shortener's
``oco link https://...`` is the callback's).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ._adapter import IncomingMessage
from ._approvals import HELP as APPROVAL_HELP
from ._audit import ALLOWED, DENIED
from ._errors import StoreError
from ._policy import PRIVATE_ROOM
from ._router import Route, compile_pattern

if TYPE_CHECKING:
    from ._config import RouteRule
    from ._core import BotCore, CallbackState

_HELP = re.compile(r"help(?:\s+(.*))?", re.IGNORECASE | re.DOTALL)
_BUILTIN = re.compile(
    r"(?P<cmd>grant|revoke|roles|who\s+can|link|unlink|rules?)(?:\s+(?P<args>.*))?", re.IGNORECASE | re.DOTALL
)
_BUILTIN_HELP = [
    "roles [<user>] - the roles you (or, for admins, <user>) hold",
    "who can <permission> - the roles and people that grant or hold <permission>",
    "link <account> - link your account with <account> (say it from both accounts)",
    "unlink [<account>] - detach an account from your linked accounts",
    "grant <user> <role> - (admins) give <user> a role",
    "revoke <user> <role> - (admins) take a role from <user>",
    "rule list [<callback>] - (admins) the route rules in force and where each comes from",
    "rule set <callback> <route> [permission=<p>|no-permission|declared-permission] [allow=<room>,...|any-room] "
    "[deny=<room>,...|no-deny] - (admins) change who may run a route, and where",
    "rule unset <callback> <route> - (admins) drop a rule set at runtime (the config's applies again)",
    *APPROVAL_HELP,
]
#: The words after ``rule`` that make it the bot's own command (else it goes to the routes).
_RULE_ACTIONS = ("list", "set", "unset")


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool) -> Any:
    return compile_pattern(pattern, ignore_case)


def _first_match(routes: list[Route], text: str) -> int | None:
    """The index of the first route whose pattern matches ``text`` (run in a thread)."""
    return next((i for i, route in enumerate(routes) if _compiled(route.pattern, route.ignore_case).search(text)), None)


def _command_word(text: str) -> str:
    """The word that names a command in a usage or a request: ``weather`` of
    ``weather <city>``, ``who can`` of ``who can <permission>``."""
    words = text.lower().split()
    if words[:2] == ["who", "can"]:
        return "who can"
    return words[0].strip("!?.,:;") if words and not words[0].startswith(("<", "[")) else ""


class ChatCommands:
    """The bot's own chat commands, for one running bot."""

    def __init__(self, core: BotCore) -> None:
        self._core = core

    def take(self, adapter: str, incoming: IncomingMessage, user_id: str, room_id: str, text: str) -> bool:
        """Answer ``text`` (what a person addressed to the bot) if it is one of the bot's
        own commands; True when the routes must not see it. Never waits: the answer is
        sent in the background. ``help`` is answered and still goes to the routes."""
        if self._core.approvals.take(adapter, incoming, user_id, text):  # approve/deny <id>
            return True
        builtin = _BUILTIN.fullmatch(text)
        if builtin and self._is_builtin(builtin.group("cmd"), builtin.group("args") or ""):
            command = " ".join(builtin.group("cmd").lower().split())
            self._core.spawn(partial(self._run, adapter, incoming, user_id, command, builtin.group("args") or ""))
            return True
        help_match = _HELP.fullmatch(text)
        if help_match:
            self._answer_help(adapter, incoming, user_id, room_id, help_match.group(1) or "")
        return False

    def unmatched(self, adapter: str, incoming: IncomingMessage, user_id: str, room_id: str, text: str) -> None:
        """Answer what a person addressed to the bot when no route matched it: the
        callback that would have taken it is not running, or there is no such command
        (with the closest one, unless ``bot.unknown_command_reply`` is off). Never
        waits: the answer is worked out and sent in the background."""
        if text.strip() and not _HELP.fullmatch(text):
            self._core.spawn(partial(self._answer_unmatched, adapter, incoming, user_id, room_id, text))

    async def _answer_unmatched(
        self, adapter: str, incoming: IncomingMessage, user_id: str, room_id: str, text: str
    ) -> None:
        core = self._core
        answer = await self._not_running(user_id, room_id, text)
        if answer is None and core.config.bot.unknown_command_reply:
            answer = self._unknown(user_id, room_id, text)
        if answer is not None:
            core.outgoing.reply(adapter, incoming, answer, mention=True)

    async def _not_running(self, user_id: str, room_id: str, text: str) -> str | None:
        """Whose respond route, among callbacks with no open stream, would take ``text``
        (one the person may run): said so, with what the bot knows of why."""
        core = self._core
        candidates: list[tuple[CallbackState, Route]] = []
        for callback_id, state in core.callbacks.items():
            if core.router.subscriptions(callback_id):
                continue
            departed = core.router.departed_routes(callback_id)
            candidates += [
                (state, route)
                for route in (state.routes if departed is None else departed)
                if route.respond and core.policies.may_run(user_id, room_id, callback_id, route)
            ]
        if not candidates:
            return None
        # Compiling a callback's patterns can take milliseconds each: not on the trio thread.
        found = await trio.to_thread.run_sync(_first_match, [route for _, route in candidates], text)
        if found is None:
            return None
        state = candidates[found][0]
        if state.given_up:
            why = "it kept failing, so the bot stopped restarting it (the bot's log says why)"
        elif state.launched:
            why = "the bot is starting it again; try again in a moment"
        else:
            why = "it is not connected to the bot"
        return f"the {state.id} callback is not running: {why}"

    def _visible(self, user_id: str, room_id: str) -> Callable[[str, Route], bool]:
        """Which routes a person may run in a room: what help shows them."""
        return lambda callback_id, route: self._core.policies.may_run(user_id, room_id, callback_id, route)

    def _unknown(self, user_id: str, room_id: str, text: str) -> str:
        core = self._core
        name = core.router.bot_name
        usages = [line.split(" - ", 1)[0].strip() for line in _BUILTIN_HELP] + ["help [<topic>]"]
        visible = self._visible(user_id, room_id)
        usages += [line.split(" - ", 1)[0].strip() for line in core.router.help_lines(visible=visible)]
        by_word: dict[str, str] = {}
        for usage in usages:
            word = _command_word(usage)
            if word:
                by_word.setdefault(word, usage)
        shown = text if len(text) <= 60 else text[:57] + "..."
        asked = _command_word(text)
        closest = difflib.get_close_matches(asked, list(by_word), n=1, cutoff=0.6) if asked else []
        if closest:
            return (
                f"no command matches {shown!r}; did you mean `{name} {by_word[closest[0]]}`? say `{name} help` for all"
            )
        return f"no command matches {shown!r}; say `{name} help` for what I can do"

    def _is_builtin(self, command: str, args: str) -> bool:
        """Whether an addressed message is the bot's own command. `link` is a common
        word for callbacks too ("oco link https://..."): it is ours only when it names
        an account on one of the bot's adapters; otherwise it goes to the routes."""
        words = args.split()
        if command.lower() in ("rule", "rules"):  # a common word too: ours only as `rule set|unset|list`
            return bool(words) and words[0].lower() in _RULE_ACTIONS
        if command.lower() != "link":
            return True
        return len(words) == 1 and words[0].partition("/")[0] in self._core.links

    def _answer_help(self, adapter: str, incoming: IncomingMessage, user_id: str, room_id: str, topic: str) -> None:
        core = self._core
        topic = topic.strip()
        lines = core.router.help_lines(topic, self._visible(user_id, room_id))
        builtin = [line for line in _BUILTIN_HELP if topic and topic.lower() in line.lower()]
        if lines or builtin:
            body = "\n".join(lines + builtin)
        elif topic:
            body = f"no command matches {topic!r}; say `{core.router.bot_name} help` for all"
        else:
            body = "no callbacks with commands are connected"
        if not topic:
            body += f"\n(also: roles, who can, link; say `{core.router.bot_name} help roles` and so on)"
        core.outgoing.reply(adapter, incoming, body)

    async def _run(self, adapter: str, incoming: IncomingMessage, user_id: str, command: str, args: str) -> None:
        core = self._core
        auth = core.auth
        words = args.split()
        name = core.router.bot_name
        room = f"{adapter}/{incoming.room.id}" if incoming.room else ""
        audit = {"user": user_id, "person": auth.person(user_id), "room": room, "detail": f"{command} {args}"}
        try:
            if command in ("grant", "revoke"):
                if len(words) != 2:
                    answer = f"usage: {name} {command} <user> <role>"
                elif not auth.is_admin(user_id):
                    core.record("admin", DENIED, **audit)
                    answer = f"only admins may {command} roles (admins are listed in auth.admins of the bot's config)"
                else:
                    target = self._user_ref(adapter, words[0])
                    role = words[1]
                    if command == "grant":
                        changed = await auth.grant(target, role)
                        answer = f"{target} now has the role {role}" if changed else f"{target} already has {role}"
                    else:
                        changed = await auth.revoke(target, role)
                        answer = (
                            f"{target} no longer has the role {role}" if changed else f"{target} did not have {role}"
                        )
                    core.record("admin", ALLOWED, **audit, permission=role)
            elif command in ("rule", "rules"):
                answer = await self._rule(adapter, incoming, user_id, words, audit)
            elif command == "roles":
                target = self._user_ref(adapter, words[0]) if words else user_id
                if target != user_id and not auth.is_admin(user_id) and target not in auth.accounts(user_id):
                    answer = "only admins may see another person's roles"
                else:
                    roles = auth.roles(target)
                    admin = " (admin)" if auth.is_admin(target) else ""
                    accounts = auth.accounts(target)
                    linked = f"; linked accounts: {', '.join(accounts)}" if len(accounts) > 1 else ""
                    answer = f"{target}{admin}: roles: {', '.join(roles) or 'none'}{linked}"
            elif command == "who can":
                if len(words) != 1:
                    answer = f"usage: {name} who can <permission>"
                else:
                    granting, people = auth.who_can(words[0])
                    answer = (
                        f"{words[0]}: granted by role(s) {', '.join(granting) or 'none'}; "
                        f"held by {'; '.join(people) or 'nobody yet'}"
                    )
            elif command == "link":  # _is_builtin saw one word naming an account on an adapter
                other = self._user_ref(adapter, words[0])
                if other == user_id:
                    answer = f"{other} is this account: name the other one, from each of the two"
                elif await auth.request_link(user_id, other):
                    core.record("admin", ALLOWED, **audit)
                    answer = f"linked: {user_id} and {other} are now one person; roles follow both"
                else:
                    minutes = core.config.auth.link_timeout / 60
                    answer = f"to confirm, say `{name} link {user_id}` as {other} within {minutes:.0f} minutes"
            else:  # unlink
                target = self._user_ref(adapter, words[0]) if words else user_id
                if target not in auth.accounts(user_id) and not auth.is_admin(user_id):
                    answer = f"{target} is not one of your accounts"
                elif await auth.unlink(target):
                    core.record("admin", ALLOWED, **audit)
                    answer = f"{target} is now linked to nobody"
                else:
                    answer = f"{target} is not linked to another account"
        except StoreError as exc:
            answer = f"could not save that: {exc}; try again later"
        except _AmbiguousUserError as exc:
            answer = str(exc)
        core.outgoing.reply(adapter, incoming, answer, mention=True)

    async def _rule(
        self, adapter: str, incoming: IncomingMessage, user_id: str, words: list[str], audit: dict[str, str]
    ) -> str:
        """``rule list|set|unset ...``, for admins: the route rules kept in the store."""
        from ._rules import callback_id_problem, describe, listing

        core = self._core
        name = core.router.bot_name
        action = words[0].lower()
        if not core.auth.is_admin(user_id):
            core.record("admin", DENIED, **audit)
            return f"only admins may {'see' if action == 'list' else 'change'} route rules (auth.admins of the config)"
        rules = core.auth.rules
        if action == "list":
            rows = listing(core.config, rules, words[1] if len(words) > 1 else "")
            if not rows:
                return "no route rules" + (f" for callback {words[1]}" if len(words) > 1 else "")
            lines = []
            for row in rows:
                permission, allow, deny = describe(row.rule)
                origin = f"store, set by {row.source}" if row.origin == "store" else f"config, {row.source}"
                if row.overridden:
                    origin += ", overridden by the store"
                lines.append(
                    f"{row.callback} {row.key}: permission {permission}; rooms {allow}; not in {deny} ({origin})"
                )
            return "\n".join(lines)
        if len(words) < 3:
            return f"usage: {name} rule {action} <callback> <route>" + (" <change>..." if action == "set" else "")
        callback_id, key = words[1], words[2]
        audit = {**audit, "callback": callback_id, "route": key}
        if action == "unset":
            if len(words) != 3:
                return f"usage: {name} rule unset <callback> <route>"
            removed = await rules.unset(callback_id, key)
            if not removed:
                return f"no rule for {callback_id} {key} was set at runtime (`{name} rule list` shows the rules)"
            core.record("admin", ALLOWED, **audit)
            back = core_config_rule(core, callback_id, key)
            return f"removed the rule for {callback_id} {key}" + (
                "; the config's rule applies again" if back is not None else ""
            )
        problem = callback_id_problem(callback_id)
        try:
            if problem is not None:
                raise ValueError(problem)
            # From the rule in force for that key (a config pattern such as deploy*, say),
            # so the fields not named keep what they were, not the defaults.
            rule = _changed_by_words(core.policies.rule(callback_id, key), words[3:], adapter)
        except ValueError as exc:
            return (
                f"{exc}; usage: {name} rule set <callback> <route> [permission=<p>|no-permission|"
                "declared-permission] [allow=<room>,...|any-room] [deny=<room>,...|no-deny]"
            )
        await rules.set(callback_id, key, rule, user_id)
        core.record("admin", ALLOWED, **audit, permission=rule.permission or "")
        permission, allow, deny = describe(rule)
        return f"{callback_id} {key}: permission {permission}; rooms {allow}; not in {deny} (kept in the store)"

    def _user_ref(self, adapter: str, ref: str) -> str:
        """A user named in a command: a full id (``irc/alice``), or a user id on the
        speaker's adapter (``alice``, ``@alice``), as the adapter folds it.

        Display names are anyone's to choose, so they never pick an account: a bare name
        that is no user id the bot has seen, but is someone's display name, is refused
        (``_AmbiguousUserError``) with those accounts listed, since the person meant may be
        either. One that is nobody's display name either is the id of a user not seen
        yet (a grant ahead of their first message)."""
        core = self._core
        prefix, sep, _ = ref.partition("/")
        if sep and prefix in core.links:
            return core.canonical_user(ref)
        canonical = core.canonical_user(f"{adapter}/{ref}")
        if canonical in core.directory.users:
            return canonical
        bare = ref.removeprefix("@").lower()
        candidates = sorted(
            f"{user.id} ({user.name or user.mention_name})"
            for user in core.directory.users.values()
            if user.id.startswith(adapter + "/") and bare in (user.name.lower(), user.mention_name.lower())
        )
        if candidates:
            shown = ", ".join(candidates[:5]) + (f" and {len(candidates) - 5} more" if len(candidates) > 5 else "")
            raise _AmbiguousUserError(
                f"{ref!r} is not a user I have seen, but the display name of {shown}: "
                f"say which by the full id ({canonical} for a user not seen yet)"
            )
        return canonical


class _AmbiguousUserError(Exception):
    """A user named in a command could be more than one account; the message says which."""


def core_config_rule(core: BotCore, callback_id: str, key: str) -> RouteRule | None:
    """The config's rule for exactly ``key`` of a callback, if any."""
    for cb in core.config.callbacks:
        if cb.id == callback_id:
            return cb.route_rules.get(key)
    return None


def _changed_by_words(base: RouteRule | None, words: list[str], adapter: str) -> RouteRule:
    """``base`` changed by ``permission=deploy allow=irc/#ops,private no-deny`` and the
    like (see changed_rule); ValueError naming a word it does not know. A room without
    an adapter (``#ops``) is one on the speaker's ``adapter``, as users are."""
    from ._rules import changed_rule

    permission: str | None = None
    allow: list[str] | None = None
    deny: list[str] | None = None
    declared = any_room = no_deny = False
    for word in words:
        field, sep, value = word.partition("=")
        field = field.lower()
        if not sep and field == "no-permission":
            permission = ""
        elif not sep and field == "declared-permission":
            declared = True
        elif not sep and field == "any-room":
            any_room = True
        elif not sep and field == "no-deny":
            no_deny = True
        elif sep and field == "permission" and value:
            permission = value
        elif sep and field in ("allow", "deny") and value:
            rooms = [
                room if "/" in room or room == PRIVATE_ROOM else f"{adapter}/{room}"
                for room in value.split(",")
                if room
            ]
            allow, deny = (rooms, deny) if field == "allow" else (allow, rooms)
        else:
            raise ValueError(f"{word!r} is no change a rule knows")
    return changed_rule(
        base,
        permission=permission,
        declared_permission=declared,
        allow=allow,
        any_room=any_room,
        deny=deny,
        no_deny=no_deny,
    )
