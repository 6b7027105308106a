"""Config errors a person can act on: each names the file, the line of the key at
fault and the key, in one line, says what is expected (with an example) in OCO's words
rather than pydantic's, and suggests the key or type meant when one is close.
`oco check-config` also refuses what `oco run` cannot launch or serve."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from oco_core._bot import Bot
from oco_core._cli import EXIT_CONFIG, EXIT_OK
from oco_core._config import Config, LoadedConfig, parse_config, validate_section
from oco_core._errors import ConfigError
from oco_core._plugins import load_plugins
from oco_core.testing import oco_cli

#: Phrases of pydantic's own messages; none may reach a user.
PYDANTIC_WORDS = re.compile(
    r"Input should|String should|Value should|Field required|Extra inputs|Value error|valid (list|string|integer|"
    r"dictionary|number|boolean)|should have at least|should be|pydantic|Assertion failed|type=|errors\.pydantic"
)


def error_of(text: str, source: str = "oco.yaml") -> str:
    """The message of the ConfigError that parsing ``text`` raises."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source)
    return str(caught.value)


def bot_error(text: str) -> str:
    """The message of the ConfigError that checking ``text`` against the installed
    plugins raises (as `oco check-config` and `oco run` do)."""
    loaded = parse_config(text, "oco.yaml")
    with pytest.raises(ConfigError) as caught:
        Bot(loaded, load_plugins())
    return str(caught.value)


# -- the line is the key's ------------------------------------------------------------


def test_an_unknown_top_level_key_is_reported_at_its_own_line() -> None:
    # The value (a block list) starts on the line after the key.
    error = error_of("bot:\n  name: oco\n\ncallback:\n  - id: weather\n")
    assert error.startswith("oco.yaml, line 4: callback: unknown key 'callback'"), error


def test_a_duplicate_callback_id_is_reported_at_its_second_occurrence() -> None:
    secret = "s" * 20
    error = error_of(
        f"""\
bot: {{name: oco}}
callbacks:
  - id: weather
    secret: "{secret}1"
  - id: deploy
    secret: "{secret}2"
  - id: weather
    secret: "{secret}3"
"""
    )
    assert error.startswith("oco.yaml, line 7: callbacks[2].id: callback id 'weather' appears twice"), error
    assert "callbacks[0]" in error


def test_a_callback_id_with_a_trailing_newline_is_refused() -> None:
    # `$` would match before a final newline; the whole id must be valid.
    error = error_of('callbacks:\n  - id: "weather\\n"\n    secret: "ssssssssssssssssssss"\n')
    assert error.startswith("oco.yaml, line 2: callbacks[0].id: callback ids are 1-64 letters"), error


def test_duplicate_adapter_names_are_reported_at_the_second() -> None:
    error = error_of("adapters:\n  - type: shell\n  - type: memory\n    name: shell\n")
    assert error.startswith("oco.yaml, line 4: adapters[1].name: adapters[0] is named 'shell' too"), error


def test_several_problems_are_one_line_each_in_the_files_order() -> None:
    error = error_of("log_level: verbose\nbot: {nmae: oco}\ngrpc: {listen: '127.0.0.1:99999999'}\n")
    lines = error.splitlines()
    assert [re.match(r"oco.yaml, line (\d+): ", line) is not None for line in lines] == [True] * 3, lines
    assert [line.split(":", 1)[0] for line in lines] == [f"oco.yaml, line {n}" for n in (1, 2, 3)], lines


# -- OCO's words, not pydantic's ------------------------------------------------------


def test_a_command_given_as_a_string_gets_an_example() -> None:
    error = error_of('callbacks:\n  - id: weather\n    command: "python weather.py"\n')
    assert error == (
        "oco.yaml, line 3: callbacks[0].command: expected a list, not text; "
        'for example `command: ["python", "weather.py"]`'
    )


def test_an_unknown_log_level_lists_the_levels() -> None:
    error = error_of("log_level: verbose\n")
    assert error.startswith("oco.yaml, line 1: log_level: expected one of debug, info, warning, error"), error
    assert "pattern" not in error
    assert parse_config("log_level: WARNING\n").config.log_level == "WARNING"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bot: {max_message_bytes: 0}\n", "bot.max_message_bytes: must be more than 0"),
        (
            "bot: {max_message_bytes: lots}\n",
            "expected a whole number, not text; for example `max_message_bytes: 16384`",
        ),
        (
            "bot: oco\n",
            "bot: expected a mapping of keys, not text (keys: adapter_startup_wait, aliases, "
            "callback_startup_wait, editable_messages, fetchable_files, max_attachment_bytes, max_attachments, "
            "max_message_bytes, name, unknown_command_reply)",
        ),
        ("callbacks: [{command: [python]}]\n", "callbacks[0].id: required, for example `id: weather`"),
        ("callbacks: [{id: w, command: []}]\n", "callbacks[0].command: must not be empty"),
        ("auth: {roles: {ops: deploy}}\n", "auth.roles.ops: expected a list, not text; for example `roles: "),
        ("grpc: {tls: {cert: a.crt}}\n", "grpc.tls.key: required, for example `key: bot.key`"),
        ("store: {quota: {max_keys: 0}}\n", "store.quota.max_keys: must be at least 1"),
        (
            "callbacks: [{id: w, command: [x], rate_limit: fast}]\n",
            "rate_limit: expected a whole number, not text",
        ),
    ],
)
def test_pydantic_messages_are_translated(text: str, expected: str) -> None:
    error = error_of(text)
    assert expected in error, error
    assert not PYDANTIC_WORDS.search(error), error


def _minimal(model: type[BaseModel]) -> dict[str, Any]:
    """A valid mapping for ``model``: its required keys, from their examples."""
    return {
        name: field.examples[0] if field.examples else "x"
        for name, field in model.model_fields.items()
        if field.is_required()
    }


def _options(annotation: Any) -> list[Any]:
    return [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]


def _paths(model: type[BaseModel], seen: tuple[type[BaseModel], ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key ``model`` and the models below it declare, as locations, list items
    and mapping values included (as index 0 and key "k")."""
    found: list[tuple[str | int, ...]] = []
    for name, field in model.model_fields.items():
        for option in _options(field.annotation):
            loc: tuple[str | int, ...] = (name,)
            found.append(loc)
            while typing.get_origin(option) in (list, dict):
                is_list = typing.get_origin(option) is list
                loc = (*loc, 0 if is_list else "k")
                found.append(loc)
                option = _options(typing.get_args(option)[0 if is_list else 1])[0]
            if isinstance(option, type) and issubclass(option, BaseModel) and option not in seen:
                found.extend((*loc, *inner) for inner in _paths(option, (*seen, model)))
    return sorted(set(found), key=str)


def _build(annotation: Any, loc: tuple[str | int, ...], value: object) -> object:
    """Data of type ``annotation`` with ``value`` at ``loc`` (and what is required around it)."""
    if not loc:
        return value
    for option in _options(annotation):
        origin = typing.get_origin(option)
        if origin is list and isinstance(loc[0], int):
            return [_build(typing.get_args(option)[0], loc[1:], value)]
        if origin is dict and isinstance(loc[0], str):
            return {loc[0]: _build(typing.get_args(option)[1], loc[1:], value)}
        if isinstance(option, type) and issubclass(option, BaseModel):
            return _with_value(option, loc, value)
    raise AssertionError(f"no way to {loc} in {annotation}")


def _with_value(model: type[BaseModel], loc: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """A minimal mapping for ``model`` with ``value`` placed at ``loc``."""
    data = _minimal(model)
    name = loc[0]
    assert isinstance(name, str)
    data[name] = _build(model.model_fields[name].annotation, loc[1:], value)
    return data


WRONG_KINDS: list[object] = ["text", ["a", "b"], {"k": "v"}, -7, True, 1.5, None]


def _assert_actionable(error: str, source: str) -> None:
    for line in error.splitlines():
        assert re.match(rf"{re.escape(source)}, line \d+: [\w.\[\]]+: \S", line), line
        assert not PYDANTIC_WORDS.search(line), line


def test_no_pydantic_text_for_any_wrong_value_anywhere_in_the_config() -> None:
    """Every key of every section given every kind of wrong value: each error is one
    line per problem naming file, line and key, without pydantic's wording."""
    checked = 0
    for loc in _paths(Config):
        for value in WRONG_KINDS:
            text = yaml.safe_dump(_with_value(Config, loc, value))
            try:
                parse_config(text, "oco.yaml")
            except ConfigError as exc:
                _assert_actionable(str(exc), "oco.yaml")
                checked += 1
    assert checked > 200, checked  # the walk reached the nested sections


def test_no_pydantic_text_from_the_installed_plugins_sections() -> None:
    plugins = load_plugins()
    loaded = parse_config("bot: {name: oco}\n", "oco.yaml")
    models: list[tuple[tuple[str | int, ...], type[BaseModel]]] = [
        *((("adapters", 0), kind.config_model) for kind in plugins.adapters.values()),
        *((("store",), kind.config_model) for kind in plugins.stores.values()),
        *((("datastores", 0), kind.config_model) for kind in plugins.datastores.values()),
    ]
    checked = 0
    for prefix, model in models:
        for loc in _paths(model):
            for value in WRONG_KINDS:
                try:
                    validate_section(loaded, prefix, model, _with_value(model, loc, value))
                except ConfigError as exc:
                    _assert_actionable(str(exc), "oco.yaml")
                    checked += 1
    assert checked > 20, checked


# -- did you mean ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "meant"),
    [
        ("callback: []\n", "callback", "callbacks"),
        ("bot: {nmae: oco}\n", "bot.nmae", "name"),
        ("grpc: {lisen: '127.0.0.1:0'}\n", "grpc.lisen", "listen"),
        ("callbacks: [{id: w, comand: [python]}]\n", "callbacks[0].comand", "command"),
        ("auth: {admin: [shell/alice]}\n", "auth.admin", "admins"),
        ("auth: {audit: {retention: 3}}\n", "auth.audit.retention", "retention_days"),
        ("store: {quota: {max_key: 10}}\n", "store.quota.max_key", "max_keys"),
        ("callbacks: [{id: w, secret: '${HOME}/0123456789abcdef', capabilities: {sned: []}}]\n", "sned", "send"),
        ("callbacks: [{id: w, command: [x], route_rules: {r: {permision: p}}}]\n", "permision", "permission"),
        ("callbacks: [{id: w, command: [x], routes: [{pattern: x, respnd: true}]}]\n", "routes[0].respnd", "respond"),
    ],
)
def test_a_misspelt_key_gets_did_you_mean(text: str, where: str, meant: str) -> None:
    error = error_of(text)
    assert where in error, error
    assert f"did you mean {meant!r}?" in error, error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "where", "meant"),
    [
        ("adapters: [{type: shell, nmae: ops}]\n", "adapters[0].nmae", "name"),
        ("adapters: [{type: shell, usr: alice}]\n", "adapters[0].usr", "user"),
        ("store: {type: sql, quot: {max_keys: 1}}\n", "store.quot", "quota"),
        ("store: {type: sql, ulr: 'sqlite:///x.db'}\n", "store.ulr", "url"),
    ],
)
def test_a_misspelt_key_beside_a_plugins_options_gets_did_you_mean(text: str, where: str, meant: str) -> None:
    error = bot_error(text)
    assert where in error, error
    assert f"did you mean {meant!r}?" in error, error


@pytest.mark.parametrize(
    ("text", "where", "meant"),
    [
        ("adapters: [{type: shel}]\n", "adapters[0].type", "shell"),
        ("store: {type: sqll}\n", "store.type", "sql"),
        ("datastores: [{type: postgresq}]\n", "datastores[0].type", "postgresql"),
    ],
)
def test_a_misspelt_plugin_type_gets_did_you_mean(text: str, where: str, meant: str) -> None:
    error = bot_error(text)
    assert f"oco.yaml, line 1: {where}: " in error, error
    assert f"did you mean {meant!r}?" in error, error


# -- what check-config also refuses ----------------------------------------------------


def test_a_shared_secret_is_refused_at_the_second_callback_without_showing_it() -> None:
    secret = "shared-secret-0123456789"
    error = error_of(f"callbacks:\n  - id: deploy\n    secret: {secret}\n  - id: weather\n    secret: {secret}\n")
    assert error.startswith("oco.yaml, line 5: callbacks[1].secret: callback 'weather' has the same secret as"), error
    assert "'deploy'" in error
    assert secret not in error


def test_a_route_declared_twice_is_refused() -> None:
    error = error_of(
        "callbacks:\n  - id: w\n    command: [x]\n    routes:\n"
        "      - {pattern: 'weather (\\w+)', id: weather}\n"
        "      - {pattern: 'forecast (\\w+)', id: weather}\n"
    )
    assert error.startswith("oco.yaml, line 6: callbacks[0].routes[1].id: callback 'w' declares route 'weather' twice")
    # Without ids, a route's id is its pattern.
    error = error_of("callbacks:\n  - id: w\n    command: [x]\n    routes: [{pattern: ping}, {pattern: ping}]\n")
    assert "callbacks[0].routes[1].pattern: callback 'w' declares route 'ping' twice" in error


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("127.0.0.1:99999999", "port 99999999 is out of range: use 1-65535, or 0"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        (":50051", "expected host:port"),
        ("::1:50051", "write an IPv6 host in brackets, such as [::1]:50051"),
        ("bot@example.org:50051", "is not a host name or address"),
    ],
)
def test_grpc_listen_needs_a_host_and_a_valid_port(listen: str, problem: str) -> None:
    error = error_of(f"grpc:\n  listen: '{listen}'\n")
    assert error.startswith("oco.yaml, line 2: grpc.listen: "), error
    assert problem in error, error


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.1:65535", "[::1]:50051", "localhost:1", "0.0.0.0:50051"])
def test_grpc_listen_accepts_valid_addresses(listen: str) -> None:
    assert parse_config(f"grpc: {{listen: '{listen}'}}\n").config.grpc.listen == listen


def check(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``oco check-config`` on ``text`` (with a SQLite store in ``tmp_path``)."""
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n{text}')
    return oco_cli("check-config", "--config", str(config), cwd=tmp_path, env=env)


def test_check_config_refuses_a_program_not_on_path(tmp_path: Path) -> None:
    result = check(tmp_path, "callbacks:\n  - id: weather\n    command: [pyhton-not-here, weather.py]\n")
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"oco: error: {tmp_path / 'oco.yaml'}, line 4: callbacks[0].command: "), line
    assert "program 'pyhton-not-here' is not found on the bot's PATH" in line
    assert "give its full path" in line


def test_check_config_refuses_a_missing_or_unexecutable_path(tmp_path: Path) -> None:
    script = tmp_path / "weather.sh"
    script.write_text("#!/bin/sh\n")
    result = check(
        tmp_path,
        f"callbacks:\n  - id: a\n    command: [./nothere.sh]\n  - id: b\n    command: [{script}]\n",
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert "line 4: callbacks[0].command: program './nothere.sh' does not exist" in lines[0]
    assert f"line 6: callbacks[1].command: program '{script}' is not executable; chmod +x" in lines[1]
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    result = check(tmp_path, f"callbacks:\n  - id: b\n    command: [{script}]\n")
    assert result.returncode == EXIT_OK, result.stderr


def test_a_program_is_looked_up_on_the_path_the_callback_gets(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "weather-cb"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    # On the callback's env: PATH it is found...
    result = check(tmp_path, f"callbacks:\n  - id: w\n    command: [weather-cb]\n    env: {{PATH: '{bin_dir}'}}\n")
    assert result.returncode == EXIT_OK, result.stderr
    # ... on the bot's own PATH too, which the callback inherits by default...
    result = check(tmp_path, "callbacks:\n  - id: w\n    command: [weather-cb]\n", env={"PATH": f"{bin_dir}"})
    assert result.returncode == EXIT_OK, result.stderr
    # ... but not when inherit_env leaves PATH out: then the system's default applies.
    result = check(
        tmp_path,
        "callbacks:\n  - id: w\n    command: [weather-cb]\n    inherit_env: [HOME]\n",
        env={"PATH": f"{bin_dir}:{Path(sys.executable).parent}"},
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "is not found on the system default PATH" in result.stderr
    assert f"give its full path ({program} here)" in result.stderr


def test_check_config_refuses_what_the_config_alone_makes_impossible(tmp_path: Path) -> None:
    secret = "shared-secret-0123456789"
    result = check(tmp_path, f"callbacks:\n  - {{id: a, secret: {secret}}}\n  - {{id: b, secret: {secret}}}\n")
    assert result.returncode == EXIT_CONFIG
    assert "callbacks[1].secret: callback 'b' has the same secret as callback 'a'" in result.stderr
    assert secret not in result.stderr
    result = check(tmp_path, "grpc: {listen: '127.0.0.1:99999999'}\n")
    assert result.returncode == EXIT_CONFIG
    assert "grpc.listen: port 99999999 is out of range" in result.stderr


def test_run_logs_a_missing_program_and_starts_anyway(tmp_path: Path) -> None:
    """`oco run` takes the machine's word at start-up for a later one: it says what is
    missing, once, as an error, and runs (the program may be installed later)."""
    config = tmp_path / "oco.yaml"
    config.write_text(
        f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ngrpc: {{listen: "127.0.0.1:0"}}\n'
        "callbacks:\n  - id: weather\n    command: [pyhton-not-here]\n    restart_backoff_max: 60\n"
    )
    # The shell adapter reads no input (stdin is empty): the bot starts, then stops.
    result = oco_cli("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    said = [line for line in result.stderr.splitlines() if "program 'pyhton-not-here' is not found" in line]
    assert len(said) == 1, result.stderr
    assert " ERROR " in said[0]
    assert "callbacks[0].command" in said[0]
    assert "starts anyway" in said[0]


def test_the_defaults_have_no_launch_problem() -> None:
    loaded = LoadedConfig(Config(), "<defaults>", {})
    assert Bot(loaded, load_plugins()).launch_problems == []


# -- files built to hurt the parser ---------------------------------------------------


def billion_laughs(levels: int, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: about
    width ** levels values once expanded, from a few hundred bytes."""
    lines = ["x0: &x0 [" + ", ".join(["lol"] * width) + "]"]
    for n in range(1, levels):
        lines.append(f"x{n}: &x{n} [" + ", ".join([f"*x{n - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_one_line_at_once(tmp_path: Path) -> None:
    # 387 million values expanded: check-config took 9.8 GB and 120 s.
    text = billion_laughs(9)
    assert len(text) < 500
    started = time.monotonic()
    result = check(tmp_path, text)
    assert result.returncode == EXIT_CONFIG, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"oco: error: {tmp_path / 'oco.yaml'}, line "), line
    assert "aliases repeat more than 10,000 values" in line, line
    assert time.monotonic() - started < 30


def test_an_alias_bomb_past_the_limit_is_refused_before_validation() -> None:
    # 100,000 values under unknown keys: refused for its aliases, not after expanding them.
    error = error_of(billion_laughs(5, width=10))
    assert error.startswith("oco.yaml, line "), error
    assert "aliases repeat more than 10,000 values" in error, error


def test_aliases_that_reuse_a_block_still_work() -> None:
    secret = "s" * 20
    loaded = parse_config(
        f"""\
callbacks:
  - id: weather
    secret: "{secret}1"
    env: &shared {{UNITS: metric, LANG: en}}
  - id: deploy
    secret: "{secret}2"
    env: *shared
"""
    )
    assert [cb.env for cb in loaded.config.callbacks] == [{"UNITS": "metric", "LANG": "en"}] * 2


@pytest.mark.parametrize(
    "text",
    [
        "bot: " + "[" * 5000 + "]" * 5000 + "\n",
        "bot: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        "".join(f"{'  ' * n}k{n}:\n" for n in range(2000)) + "  " * 2000 + "end: 1\n",
    ],
    ids=["flow lists", "flow mappings", "block mappings"],
)
def test_deep_nesting_is_refused_in_one_line(tmp_path: Path, text: str) -> None:
    # It was a RecursionError traceback.
    result = check(tmp_path, text)
    assert result.returncode == EXIT_CONFIG, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert "nested deeper than 50 levels" in line, line
    assert line.startswith(f"oco: error: {tmp_path / 'oco.yaml'}, line "), line


def test_nesting_up_to_the_limit_is_read() -> None:
    # Fifty levels below a key the config has no use for: refused for the key, not the depth.
    error = error_of("x: " + "[" * 50 + "]" * 50 + "\n")
    assert "unknown key 'x'" in error, error


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    error = error_of("bot: &a [*a]\n")
    assert error.startswith("oco.yaml, line 1: bot[0]: nested deeper than 50 levels through aliases"), error


def test_merge_keys_and_x_anchors_share_settings_between_callbacks() -> None:
    loaded = parse_config(
        """\
x-launched: &launched
  inherit_env: ["*"]
  restart_backoff_max: 10
callbacks:
  - <<: *launched
    id: weather
    command: ["python", "weather.py"]
  - <<: *launched
    id: deploy
    command: ["python", "deploy.py"]
    restart_backoff_max: 5
""",
        "oco.yaml",
    )
    weather, deploy = loaded.config.callbacks
    assert (weather.inherit_env, weather.restart_backoff_max) == (["*"], 10)
    assert (deploy.inherit_env, deploy.restart_backoff_max) == (["*"], 5)  # its own key wins


def test_a_tag_the_loader_does_not_know_is_one_line_not_a_traceback() -> None:
    error = error_of("bot: !!python/object:os.system x\n")
    assert error.startswith("oco.yaml, line 1, column 6: not valid YAML: could not determine a constructor"), error
    assert "\n" not in error
