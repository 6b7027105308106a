"""The adapter's pieces that need no homeserver: config, formatting, plugin registration."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import oco_adapter_matrix
import pydantic
import pytest
from oco_adapter_matrix import MatrixAdapter, MatrixConfig
from oco_adapter_matrix._format import leading_pill, markdown_to_html, pill, split_body, strip_reply_fallback
from oco_adapter_matrix._transport import _split_token

BASE = {"homeserver": "https://matrix.example.org/", "user_id": "@oco:example.org", "password": "pw"}


def test_config_minimal_and_defaults() -> None:
    config = MatrixConfig.model_validate(BASE)
    assert config.homeserver == "https://matrix.example.org"
    assert config.localpart == "oco"
    assert config.encryption is True
    assert config.autojoin_invites == []
    assert config.message_type == "notice"
    assert isinstance(config.store_path, Path)


def test_config_keeps_secrets_out_of_repr() -> None:
    config = MatrixConfig.model_validate({**BASE, "password": "hunter2"})
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config)
    token = MatrixConfig.model_validate({**BASE, "password": None, "access_token": "syt_secret"})
    assert "syt_secret" not in repr(token)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"homeserver": "matrix.example.org"}, "http"),
        ({"user_id": "oco"}, "full Matrix user id"),
        ({"rooms": ["ops"]}, "neither a room id"),
        ({"password": None}, "exactly one of password or access_token"),
        ({"access_token": "t"}, "exactly one of password or access_token"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
        ({"message_type": "shout"}, "notice"),
    ],
)
def test_config_errors_name_the_problem(change: dict[str, object], complaint: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=complaint):
        MatrixConfig.model_validate({**BASE, **change})


def test_autojoin_false_means_off() -> None:
    assert MatrixConfig.model_validate({**BASE, "autojoin_invites": False}).autojoin_invites == []
    allowed = MatrixConfig.model_validate({**BASE, "autojoin_invites": ["@*:example.org"]})
    assert allowed.autojoin_invites == ["@*:example.org"]


def test_markdown_becomes_matrix_html() -> None:
    assert markdown_to_html("PONG") == "PONG"
    assert markdown_to_html("**PONG**") == "<strong>PONG</strong>"
    assert markdown_to_html("`x` and\nnext") == "<code>x</code> and<br />\nnext"
    assert "<ul>" in markdown_to_html("- a\n- b")
    # Raw HTML from a callback is shown, never interpreted.
    assert "<script>" not in markdown_to_html("<script>alert(1)</script>")


def test_pills() -> None:
    made = pill("@oco:example.org", "OCO <bot>")
    assert made == '<a href="https://matrix.to/#/@oco:example.org">OCO &lt;bot&gt;</a>'
    assert leading_pill(made + ": ping") == ("@oco:example.org", "OCO <bot>")
    assert leading_pill('<a href="https://matrix.to/#/%40oco%3Aexample.org">oco</a> hi') == ("@oco:example.org", "oco")
    assert leading_pill("hello <a href='https://matrix.to/#/@oco:example.org'>oco</a>") is None


def test_reply_fallback_is_dropped() -> None:
    assert strip_reply_fallback("> <@a:x> earlier\n> more\n\noco: ping") == "oco: ping"
    assert strip_reply_fallback("oco: ping") == "oco: ping"


def test_registered_through_the_oco_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="oco")
    matrix = [ep for ep in entry_points if ep.name == "matrix"]
    assert matrix, "no oco entry point named matrix"
    module = matrix[0].load()
    assert module is oco_adapter_matrix
    (adapter_type,) = module.oco_adapter_types()
    assert adapter_type.name == "matrix"
    assert adapter_type.config_model is MatrixConfig
    assert adapter_type.package == "oco-adapter-matrix"
    assert isinstance(adapter_type.create(MatrixConfig.model_validate(BASE)), MatrixAdapter)


def test_public_names_are_exported() -> None:
    for name in oco_adapter_matrix.__all__:
        assert getattr(oco_adapter_matrix, name).__doc__, f"{name} has no docstring"


def test_access_token_moves_from_the_query_to_a_header() -> None:
    path, token = _split_token("/_matrix/client/v3/sync?access_token=syt_abc&since=s1&timeout=30000")
    assert token == "syt_abc"
    assert path == "/_matrix/client/v3/sync?since=s1&timeout=30000"
    assert _split_token("/_matrix/client/versions") == ("/_matrix/client/versions", None)


def test_split_body_cuts_at_lines_then_spaces_then_characters() -> None:
    assert split_body("short") == ["short"]
    lines = "\n".join(f"line {n}" for n in range(100))
    pieces = split_body(lines, limit=100)
    assert "".join(pieces) == lines
    assert all(piece.endswith("\n") or piece == pieces[-1] for piece in pieces)
    words = " ".join(["word"] * 100)
    assert all(piece.endswith(" ") or piece == split_body(words, limit=50)[-1] for piece in split_body(words, limit=50))
    blob = "漢🙂" * 100  # no spaces: cut between characters; each costs 6 and 12 bytes of JSON
    pieces = split_body(blob, limit=40)
    assert "".join(pieces) == blob
    assert all(len(json.dumps(piece)) - 2 <= 40 for piece in pieces)
