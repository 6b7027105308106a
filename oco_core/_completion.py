"""``oco completion bash|zsh|fish``: shell completion scripts written from the parser.

The script is static: every command, option and choice is read from ``oco``'s argparse
parser when the script is printed, so completing costs the shell no Python start-up
and stays in step with the parser of the installed version (print it again after an
upgrade). Only the standard library is imported, as for ``oco --help``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__


@dataclass
class _Option:
    flags: list[str]
    help: str
    #: "" for a flag without a value, "file", "dir", "choice" or "value".
    value: str
    choices: list[str] = field(default_factory=list)


@dataclass
class _Command:
    path: str  # "" for oco itself, "/callbacks/add" for `oco callbacks add`
    help: str
    subcommands: list[str] = field(default_factory=list)
    options: list[_Option] = field(default_factory=list)
    #: Words a positional argument may be (its choices).
    positional_choices: list[str] = field(default_factory=list)


def _commands(parser: argparse.ArgumentParser, path: str = "", help: str = "") -> list[_Command]:
    command = _Command(path, help)
    found = [command]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                command.subcommands.append(name)
                found += _commands(sub, f"{path}/{name}", helps.get(name, ""))
        elif action.option_strings:
            if action.nargs == 0:
                value = ""
            elif action.choices is not None:
                value = "choice"
            elif action.type is Path:
                value = "dir" if action.dest == "out" else "file"  # proto --out is a directory
            elif action.dest == "config":
                value = "file"  # a path, though declared without type=Path
            else:
                value = "value"
            choices = [str(c) for c in action.choices] if action.choices is not None else []
            command.options.append(_Option(list(action.option_strings), action.help or "", value, choices))
        elif action.choices is not None:
            command.positional_choices += [str(c) for c in action.choices]
    return found


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` ("bash", "zsh" or "fish")."""
    commands = _commands(parser)
    if shell == "fish":
        return _fish(commands)
    body = _bash(commands)
    if shell == "zsh":
        # zsh runs bash completion functions through its bashcompinit layer.
        return "#compdef oco\nautoload -U +X bashcompinit && bashcompinit\n" + body
    return body


def _bash(commands: list[_Command]) -> str:
    paths = "|".join(c.path for c in commands if c.path)
    value_cases: dict[str, list[str]] = {}  # what to offer -> the "path:option" words it follows
    word_cases = []
    for command in commands:
        for option in command.options:
            if not option.value:
                continue
            if option.value == "file":
                action = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
            elif option.value == "dir":
                action = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur"))'
            elif option.value == "choice":
                action = f'COMPREPLY=($(compgen -W "{" ".join(option.choices)}" -- "$cur"))'
            else:
                action = "COMPREPLY=()"  # a value to type, nothing to offer
            value_cases.setdefault(action, []).extend(f"{command.path}:{flag}" for flag in option.flags)
        words = command.subcommands + command.positional_choices + [f for o in command.options for f in o.flags]
        word_cases.append(f'        "{command.path}") offer="{" ".join(words)}" ;;')
    return f"""# bash completion for oco {__version__}, printed by `oco completion bash`
_oco() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} at="" offer="" i
    # The (sub)command so far, from the words before the cursor that name one. (Not
    # "path" or "words": zsh, running this through bashcompinit, gives those meanings.)
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "$at/${{COMP_WORDS[i]}}" in
            {paths}) at="$at/${{COMP_WORDS[i]}}" ;;
        esac
    done
    case "$at:$prev" in
{chr(10).join(f"        {'|'.join(keys)}) {action}; return ;;" for action, keys in value_cases.items())}
    esac
    case "$at" in
{chr(10).join(word_cases)}
    esac
    COMPREPLY=($(compgen -W "$offer" -- "$cur"))
}}
complete -F _oco oco
"""


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(commands: list[_Command]) -> str:
    paths = " ".join(c.path for c in commands if c.path)
    lines = [
        f"# fish completion for oco {__version__}, printed by `oco completion fish`",
        "function __oco_path",
        "    set -l path ''",
        "    for word in (commandline -opc)[2..-1]",
        f"        if contains -- $path/$word {paths}",
        "            set path $path/$word",
        "        end",
        "    end",
        "    echo $path",
        "end",
        "function __oco_at",
        "    set -l path (__oco_path)",
        '    test "$path" = "$argv[1]"',
        "end",
        "complete -c oco -f",
    ]
    helps = {c.path: c.help for c in commands}
    for command in commands:
        at = f"-n {_fish_quote('__oco_at ' + (command.path or chr(39) + chr(39)))}"
        for name in command.subcommands:
            sub = f"{command.path}/{name}"
            lines.append(f"complete -c oco {at} -a {_fish_quote(name)} -d {_fish_quote(helps.get(sub, ''))}")
        if command.positional_choices:
            lines.append(f"complete -c oco {at} -a {_fish_quote(' '.join(command.positional_choices))}")
        for option in command.options:
            flags = " ".join(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in option.flags)
            value = {
                "": "",
                "file": " -r -F",
                "dir": " -r -F",
                "choice": f" -x -a {_fish_quote(' '.join(option.choices))}",
                "value": " -x",
            }[option.value]
            lines.append(f"complete -c oco {at} {flags}{value} -d {_fish_quote(option.help)}")
    return "\n".join(lines) + "\n"
