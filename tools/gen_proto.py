"""Regenerate oco_core/_proto from proto/oco, or check that it is fresh.

    python tools/gen_proto.py          # rewrite the generated modules
    python tools/gen_proto.py --check  # exit 1 if they differ from what is committed

The .proto files import each other by bare name (``import "core.proto"``), as the
OpenChatOps specification's files do, so protoc emits ``import core_pb2``; we rewrite
that to a relative import so the modules live inside the oco_core package. The .proto
files are copied beside them so that ``oco proto --out`` works from an installed wheel.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proto" / "oco"
TARGET = ROOT / "oco_core" / "_proto"
_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
_STUB_IMPORT = re.compile(r"^import (\w+_pb2)$", re.MULTILINE)


def generate(out: Path) -> None:
    protos = sorted(SOURCE.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent  # where pip put protoc-gen-mypy
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{SOURCE}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[p.name for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.glob("*.py*"):
        text = path.read_text()
        text = _IMPORT.sub(r"from . import \1 as \2", text)
        text = _STUB_IMPORT.sub(r"from . import \1", text)
        path.write_text(text)
    for proto in protos:
        shutil.copy(proto, out / proto.name)
    (out / "__init__.py").write_text('"""Generated from proto/oco by tools/gen_proto.py; do not edit."""\n')
    (out / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        if options.check:
            fresh = sorted(p.name for p in out.iterdir())
            committed = sorted(p.name for p in TARGET.iterdir() if p.name != "__pycache__")
            stale = [n for n in fresh if n not in committed or not filecmp.cmp(out / n, TARGET / n, shallow=False)]
            stale += [n for n in committed if n not in fresh]
            if stale:
                print(f"oco_core/_proto is stale ({', '.join(stale)}): run python tools/gen_proto.py", file=sys.stderr)
                return 1
            print("oco_core/_proto is fresh")
            return 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(out, TARGET)
    print(f"generated {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
