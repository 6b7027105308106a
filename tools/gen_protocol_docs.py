"""Write docs/protocol.md from the comments in proto/oco/*.proto, or check that it is fresh.

    python tools/gen_protocol_docs.py          # rewrite docs/protocol.md
    python tools/gen_protocol_docs.py --check  # exit 1 if docs/protocol.md is stale

protoc (from grpcio-tools, the code generator the project already uses) compiles the
files into a descriptor set with source info (``--include_source_info``); every
service, method, message, field, enum and value comes with the comments written above
or beside it, and the reference is rendered from that alone.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proto" / "oco"
TARGET = ROOT / "docs" / "protocol.md"
#: The order of the reference: the specification's files first, test-only last.
ORDER = ["core.proto", "robot.proto", "storage.proto", "directory.proto", "control.proto"]

# Field numbers inside descriptor.proto, which make up SourceCodeInfo location paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX, _FILE_PACKAGE = 4, 5, 6, 12, 2
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    """The .proto files compiled by protoc, with their comments."""
    names = sorted((p.name for p in SOURCE.glob("*.proto")), key=lambda n: [*ORDER, n].index(n))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "oco.desc"
        args = ["protoc", f"-I{SOURCE}", f"-I{include}", "--include_source_info", f"--descriptor_set_out={out}"]
        if protoc.main([*args, *names]) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class _Comments:
    """The comments of one file, by location path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path: dict[tuple[int, ...], descriptor_pb2.SourceCodeInfo.Location] = {
            tuple(loc.path): loc for loc in file.source_code_info.location
        }

    def text(self, path: tuple[int, ...]) -> str:
        """The leading and trailing comments at ``path``, as Markdown paragraphs."""
        loc = self._by_path.get(path)
        if loc is None:
            return ""
        parts = [_escape(_dedent(c)) for c in (loc.leading_comments, loc.trailing_comments) if c.strip()]
        return "\n\n".join(parts)

    def detached(self, path: tuple[int, ...]) -> list[str]:
        """Comments separated by a blank line from what follows ``path``'s element."""
        loc = self._by_path.get(path)
        return [_escape(_dedent(c)) for c in loc.leading_detached_comments] if loc else []


def _dedent(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


def _escape(text: str) -> str:
    """Markdown that shows ``<app>`` as written: angle brackets outside `code` would be HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """A comment squeezed into one table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(full_name: str) -> str:
    return full_name.lstrip(".")


def _link(full_name: str) -> str:
    name = _anchor(full_name)
    return f"[`{name.removeprefix('oco.')}`](#{name})"


def _field_type(field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, tuple[str, str]]) -> str:
    if field.type_name in maps:
        key, value = maps[field.type_name]
        return f"`map<{key}, {value}>`"
    base = _link(field.type_name) if field.type_name else f"`{_SCALARS[field.type]}`"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {base}"
    if field.proto3_optional:
        return f"optional {base}"
    return base


def _map_entries(message: descriptor_pb2.DescriptorProto, prefix: str) -> dict[str, tuple[str, str]]:
    maps: dict[str, tuple[str, str]] = {}
    for nested in message.nested_type:
        if nested.options.map_entry:
            key, value = nested.field
            value_type = value.type_name.removeprefix(".oco.") if value.type_name else _SCALARS[value.type]
            maps[f"{prefix}.{nested.name}"] = (_SCALARS[key.type], value_type)
    return maps


def _message(
    out: list[str],
    message: descriptor_pb2.DescriptorProto,
    prefix: str,
    path: tuple[int, ...],
    comments: _Comments,
) -> None:
    full = f"{prefix}.{message.name}"
    maps = _map_entries(message, full)
    out += [f'<a id="{_anchor(full)}"></a>', "", f"### {_anchor(full).removeprefix('oco.')}", ""]
    doc = comments.text(path)
    if doc:
        out += [doc, ""]
    real_oneofs = {
        i: o.name
        for i, o in enumerate(message.oneof_decl)
        if not any(f.proto3_optional and f.oneof_index == i and f.HasField("oneof_index") for f in message.field)
    }
    if message.field:
        out += ["| field | number | type | description |", "|---|---|---|---|"]
        for index, field in enumerate(message.field):
            description = _cell(comments.text((*path, _MESSAGE_FIELD, index)))
            if field.HasField("oneof_index") and field.oneof_index in real_oneofs:
                description = f"(oneof `{real_oneofs[field.oneof_index]}`) {description}".rstrip()
            out.append(f"| `{field.name}` | {field.number} | {_field_type(field, maps)} | {description} |")
        out.append("")
    else:
        out += ["(no fields)", ""]
    for index, enum in enumerate(message.enum_type):
        _enum(out, enum, full, (*path, _MESSAGE_ENUM, index), comments)
    for index, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            _message(out, nested, full, (*path, _MESSAGE_NESTED, index), comments)


def _enum(
    out: list[str], enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...], comments: _Comments
) -> None:
    full = f"{prefix}.{enum.name}"
    out += [f'<a id="{_anchor(full)}"></a>', "", f"### {_anchor(full).removeprefix('oco.')} (enum)", ""]
    doc = comments.text(path)
    if doc:
        out += [doc, ""]
    out += ["| value | number | description |", "|---|---|---|"]
    for index, value in enumerate(enum.value):
        out.append(f"| `{value.name}` | {value.number} | {_cell(comments.text((*path, _ENUM_VALUE, index)))} |")
    out.append("")


def _service(
    out: list[str], service: descriptor_pb2.ServiceDescriptorProto, package: str, index: int, comments: _Comments
) -> None:
    full = f".{package}.{service.name}"
    path = (_FILE_SERVICE, index)
    out += [f'<a id="{_anchor(full)}"></a>', "", f"### service {_anchor(full)}", ""]
    doc = comments.text(path)
    if doc:
        out += [doc, ""]
    for number, method in enumerate(service.method):
        request = ("stream " if method.client_streaming else "") + _link(method.input_type)
        response = ("stream " if method.server_streaming else "") + _link(method.output_type)
        out += [f"#### `{method.name}` ({request}) → {response}", ""]
        out += [f"`/{_anchor(full)}/{method.name}`", ""]
        doc = comments.text((*path, _SERVICE_METHOD, number))
        if doc:
            out += [doc, ""]


def _file(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    comments = _Comments(file)
    out: list[str] = [f"## {file.name}", ""]
    intro = [*comments.detached((_FILE_SYNTAX,)), comments.text((_FILE_SYNTAX,))]
    intro += [*comments.detached((_FILE_PACKAGE,)), comments.text((_FILE_PACKAGE,))]
    out += [paragraph + "\n" for paragraph in intro if paragraph]
    if file.dependency:
        out += [f"Imports: {', '.join(f'`{d}`' for d in file.dependency)}.", ""]
    for index, service in enumerate(file.service):
        _service(out, service, file.package, index, comments)
    for index, message in enumerate(file.message_type):
        _message(out, message, f".{file.package}", (_FILE_MESSAGE, index), comments)
    for index, enum in enumerate(file.enum_type):
        _enum(out, enum, f".{file.package}", (_FILE_ENUM, index), comments)
    yield from out


def render(files: descriptor_pb2.FileDescriptorSet) -> str:
    """The whole reference, as Markdown."""
    lines = [
        "# The OCO protocol reference",
        "",
        "<!-- Generated by tools/gen_protocol_docs.py from proto/oco/*.proto; do not edit. -->",
        "",
        "Generated from the comments in the .proto files (`oco proto --out DIR` writes them for",
        "code generators in any language). Package `oco`, proto3. The specification's messages",
        "and the four RPCs of `oco.Robot` keep their names, numbers and types; everything marked",
        "*Extension* is OCO's, added the ways proto3 keeps compatible (see",
        "[proto/README.md](../proto/README.md)). How to use it from a new language:",
        "[writing-a-callback.md](writing-a-callback.md).",
        "",
        "Contents: " + ", ".join(f"[{f.name}](#{f.name.replace('.', '')})" for f in files.file) + ".",
        "",
    ]
    for file in files.file:
        lines += list(_file(file))
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/protocol.md is stale")
    options = parser.parse_args()
    fresh = render(descriptors())
    if options.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != fresh:
            diff = difflib.unified_diff(
                current.splitlines(), fresh.splitlines(), "docs/protocol.md", "generated", lineterm="", n=1
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print("docs/protocol.md is stale: run python tools/gen_protocol_docs.py", file=sys.stderr)
            return 1
        print("docs/protocol.md is fresh")
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(fresh, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
