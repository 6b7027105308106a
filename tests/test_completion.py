"""``oco completion bash|zsh|fish``: the printed script, loaded into the real shell,
completes commands, subcommands, options, choices and file names.

bash is driven through the completion function it registers (COMP_WORDS/COMP_CWORD
set as readline would), zsh through its bashcompinit layer's ``compgen -F`` (which is
what zsh calls on Tab), fish through ``complete -C``, which prints what Tab offers. A
shell that is not installed is skipped, saying so (in CI, which installs them, it fails).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from oco_core.testing import oco_cli
from oco_core.testing.pytest_plugin import server_unavailable

#: (the command line, the cursor at its end; what completing the last word offers,
#: help options aside). "{tmp}" is the test's directory, holding oco.yaml.
CASES: list[tuple[list[str], set[str]]] = [
    (["oco", "ru"], {"rules", "run"}),
    (["oco", "rules", "set", "--n"], {"--no-deny", "--no-permission"}),
    (["oco", "roles", ""], {"grant", "list", "revoke"}),
    (["oco", "callbacks", ""], {"add", "list", "remove", "rotate"}),
    (["oco", "datastores", "re"], {"revoke"}),
    (["oco", "audit", "--decision", ""], {"allowed", "denied"}),
    (["oco", "run", "--con"], {"--config"}),
    (["oco", "--debug", "datastores", "revoke", "--d"], {"--drop-data"}),
    (["oco", "run", "--config", "{tmp}/oc"], {"{tmp}/oco.yaml"}),
    (["oco", "completion", ""], {"bash", "fish", "zsh"}),
]
IDS = [" ".join(words) for words, _ in CASES]


def script(shell: str, tmp_path: Path) -> Path:
    result = oco_cli("completion", shell, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "scripts" / f"oco.{shell}"  # not beside oco.yaml, which file names complete to
    path.parent.mkdir()
    path.write_text(result.stdout)
    return path


def shell_or_skip(name: str) -> str:
    """The shell's path; skipped without it (failed in CI, which installs it)."""
    found = shutil.which(name)
    if found is None:
        server_unavailable(name, f"it is not installed (apt-get install {name})")
    return found


def offered(lines: str, current: str) -> set[str]:
    """What the shell would show: candidates for the current word, help aside. bash's
    compgen filters by the word already; zsh filters bashcompinit's list itself."""
    words = {line.split("\t")[0] for line in lines.splitlines() if line.strip()}
    return {w for w in words if w.startswith(current) and w not in ("-h", "--help")}


def prepare(tmp_path: Path, words: list[str], expected: set[str]) -> tuple[list[str], set[str]]:
    (tmp_path / "oco.yaml").write_text("{}\n")
    return [w.replace("{tmp}", str(tmp_path)) for w in words], {e.replace("{tmp}", str(tmp_path)) for e in expected}


@pytest.mark.parametrize(("words", "expected"), CASES, ids=IDS)
def test_bash(tmp_path: Path, words: list[str], expected: set[str]) -> None:
    bash = shell_or_skip("bash")
    words, expected = prepare(tmp_path, words, expected)
    path = script("bash", tmp_path)
    program = (
        f"source {shlex.quote(str(path))}\n"
        f"COMP_WORDS=({shlex.join(words)}); COMP_CWORD={len(words) - 1}\n"
        # The function complete registered for oco, called as readline calls it.
        "$(complete -p oco | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p') oco\n"
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run([bash, "--norc", "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert offered(result.stdout, words[-1]) == expected, result


@pytest.mark.parametrize(("words", "expected"), CASES, ids=IDS)
def test_zsh(tmp_path: Path, words: list[str], expected: set[str]) -> None:
    zsh = shell_or_skip("zsh")
    words, expected = prepare(tmp_path, words, expected)
    path = script("zsh", tmp_path)
    quoted = " ".join(shlex.quote(w) for w in words)
    program = (
        "autoload -U compinit && compinit -u\n"
        f"source {shlex.quote(str(path))}\n"
        # What zsh and bashcompinit's _bash_complete set before it calls compgen -F.
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; words=({quoted}); CURRENT={len(words)}\n"
        f"PREFIX={shlex.quote(words[-1])}\n"
        f"compgen -F _oco -- {shlex.quote(words[-1])}"
    )
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}  # no user's .zshrc or compdump
    result = subprocess.run(
        [zsh, "-f", "-c", program], capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path, env=env
    )
    assert offered(result.stdout, words[-1]) == expected, result


@pytest.mark.parametrize(("words", "expected"), CASES, ids=IDS)
def test_fish(tmp_path: Path, words: list[str], expected: set[str]) -> None:
    fish = shell_or_skip("fish")
    words, expected = prepare(tmp_path, words, expected)
    path = script("fish", tmp_path)
    line = " ".join(shlex.quote(w) if w else "" for w in words[:-1]) + " " + words[-1]
    program = f"source {shlex.quote(str(path))}; complete -C{shlex.quote(line)}"
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run(
        [fish, "--no-config", "-c", program], capture_output=True, text=True, timeout=60, check=True, env=env
    )
    assert offered(result.stdout, words[-1]) == expected, result


def test_completion_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for shell in ("bash", "zsh", "fish"):
        assert f"oco completion {shell}" in readme
