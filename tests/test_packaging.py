"""Every distribution as PyPI and pip will see it: each one's wheel and sdist are built
here, as a release would build them, and their contents and metadata checked.

``python -m build --no-isolation`` builds the sdist and then the wheel from that sdist, so
a file the wheel needs but the sdist lacks fails here too. Without isolation the build
uses this environment's hatchling and hatch-fancy-pypi-readme (noxfile.py's TEST_TOOLS).

This module is left out of oco-core's sdist: it builds the repository's other
distributions, which an unpacked sdist does not hold.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from packaging.metadata import Metadata
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Each distribution's folder and what its sdist holds at its top level besides
# pyproject.toml, PKG-INFO and hatchling's copy of .gitignore (kept so that a wheel built
# from the sdist leaves out what a wheel built from the repository leaves out).
DISTRIBUTIONS = {
    "oco-core": (".", {"oco_core", "tests", "proto", "docs", "examples", "README.md", "CHANGELOG.md", "LICENSE"}),
    "oco-adapter-irc": ("adapters/irc", {"oco_adapter_irc", "tests", "README.md", "LICENSE"}),
    "oco-adapter-matrix": ("adapters/matrix", {"oco_adapter_matrix", "tests", "README.md", "LICENSE"}),
    "oco-store-redis": ("stores/redis", {"oco_store_redis", "tests", "README.md", "LICENSE"}),
}
ALWAYS = {"pyproject.toml", "PKG-INFO", ".gitignore"}
URL_LABELS = {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
CLASSIFIERS = {
    "Development Status :: 3 - Alpha",
    "Framework :: Trio",
    "Intended Audience :: Developers",
    "Intended Audience :: System Administrators",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Python :: 3 :: Only",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Topic :: Communications :: Chat",
    "Typing :: Typed",
}
# A link target with a scheme (https:, mailto:) leads somewhere from PyPI's page; a path
# or a bare #anchor does not.
ABSOLUTE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
LINK_TARGETS = [
    re.compile(r"\]\(\s*<?([^)\s>]+)"),  # [text](target) and ![alt](target)
    re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.MULTILINE),  # [label]: target
    re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)"""),  # HTML
]


@dataclass(frozen=True)
class Built:
    name: str
    folder: Path
    metadata: Metadata
    sdist: dict[str, bytes]  # path inside the sdist, without its top folder -> content
    wheel: dict[str, bytes]


def _build(name: str, folder: Path, out: Path) -> Built:
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"building {name} failed:\n{result.stdout}\n{result.stderr}"
    (sdist_path,) = out.glob("*.tar.gz")
    (wheel_path,) = out.glob("*.whl")
    with tarfile.open(sdist_path) as tar:
        sdist = {}
        for member in tar.getmembers():
            if member.isfile():
                content = tar.extractfile(member)
                assert content is not None
                sdist[str(PurePosixPath(*PurePosixPath(member.name).parts[1:]))] = content.read()
    with zipfile.ZipFile(wheel_path) as whl:
        wheel = {info.filename: whl.read(info) for info in whl.infolist()}
    (metadata_file,) = (path for path in wheel if path.endswith(".dist-info/METADATA"))
    metadata = Metadata.from_email(wheel[metadata_file].decode(), validate=True)
    assert canonicalize_name(metadata.name) == name
    return Built(name, folder, metadata, sdist, wheel)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every distribution, built once for the module."""
    out = tmp_path_factory.mktemp("dist")
    return {name: _build(name, ROOT / folder, out / name) for name, (folder, _) in DISTRIBUTIONS.items()}


def _tracked(folder: Path) -> set[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True, text=True, check=True
    ).stdout
    return {path for path in listed.split("\0") if path}


NAMES = list(DISTRIBUTIONS)


@pytest.mark.parametrize("name", NAMES)
def test_license_is_in_the_wheel_and_the_sdist(built: dict[str, Built], name: str) -> None:
    dist = built[name]
    license_text = (ROOT / "LICENSE").read_bytes()
    assert b"MIT License" in license_text
    assert dist.sdist.get("LICENSE") == license_text, f"{name}'s sdist lacks the MIT LICENSE"
    in_wheel = [path for path in dist.wheel if path.endswith(".dist-info/licenses/LICENSE")]
    assert in_wheel, f"{name}'s wheel lacks .dist-info/licenses/LICENSE"
    assert dist.wheel[in_wheel[0]] == license_text
    assert dist.metadata.license_expression == "MIT"
    assert dist.metadata.license_files == ["LICENSE"]
    # PEP 639: the expression replaces License classifiers, and PyPI refuses uploads with both.
    assert not [c for c in dist.metadata.classifiers or [] if c.startswith("License ::")]


@pytest.mark.parametrize("name", NAMES)
def test_project_urls_share_one_base(built: dict[str, Built], name: str) -> None:
    urls = built[name].metadata.project_urls or {}
    assert set(urls) == URL_LABELS, f"{name}'s [project.urls]"
    base = (built["oco-core"].metadata.project_urls or {})["Homepage"]
    wrong = {label: url for label, url in urls.items() if not url.startswith(base)}
    assert not wrong, f"{name}'s urls should all start with oco-core's Homepage {base}: {wrong}"
    assert urls["Changelog"] == f"{base}/blob/main/CHANGELOG.md"
    assert (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_classifiers(built: dict[str, Built], name: str) -> None:
    metadata = built[name].metadata
    missing = CLASSIFIERS - set(metadata.classifiers or [])
    assert not missing, f"{name} lacks the classifiers {sorted(missing)}"
    assert str(metadata.requires_python) == ">=3.11"
    if name == "oco-adapter-irc":
        assert "Topic :: Communications :: Chat :: Internet Relay Chat" in (metadata.classifiers or [])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "oco-core"])
def test_plugin_requires_the_current_oco_core_minor_series(built: dict[str, Built], name: str) -> None:
    current = built["oco-core"].metadata.version
    assert current is not None
    (requirement,) = (r for r in built[name].metadata.requires_dist or [] if r.name == "oco-core")
    spec = requirement.specifier
    major, minor = current.major, current.minor
    assert spec.contains(current), f"{name} requires {requirement}, which excludes oco-core {current}"
    assert spec.contains(Version(f"{major}.{minor}.99"))
    assert not spec.contains(Version(f"{major}.{minor + 1}.0")), f"{name}: {requirement} has no upper bound"
    if minor:
        assert not spec.contains(Version(f"{major}.{minor - 1}.99")), f"{name}: {requirement} reaches back"


@pytest.mark.parametrize("name", NAMES)
def test_sdist_holds_its_own_files_and_what_its_tests_need(built: dict[str, Built], name: str) -> None:
    dist = built[name]
    _, top_level = DISTRIBUTIONS[name]
    others = [f"{folder}/" for other, (folder, _) in DISTRIBUTIONS.items() if other != name and folder != "."]
    foreign = sorted(path for path in dist.sdist if any(path.startswith(other) for other in others))
    assert not foreign, f"{name}'s sdist holds other distributions' files: {foreign[:5]}"
    stray = sorted(path for path in dist.sdist if path.split("/")[0] not in top_level | ALWAYS)
    assert not stray, f"{name}'s sdist holds files that are not its own: {stray[:5]}"
    junk = sorted(path for path in dist.sdist if "__pycache__" in path or "node_modules" in path)
    assert not junk, f"{name}'s sdist holds build junk: {junk[:5]}"
    shipped = {
        path
        for path in _tracked(dist.folder)
        if path.split("/")[0] in top_level and not any(path.startswith(other) for other in others)
    } - {"tests/test_packaging.py"}
    missing = sorted(shipped - set(dist.sdist))
    assert not missing, f"{name}'s sdist lacks files of its own: {missing[:5]}"
    assert "tests/conftest.py" in dist.sdist


@pytest.mark.parametrize("name", NAMES)
def test_readme_links_lead_somewhere_from_pypi(built: dict[str, Built], name: str) -> None:
    metadata = built[name].metadata
    assert metadata.description_content_type == "text/markdown"
    description = metadata.description or ""
    # The README itself, not a stub: its first heading is there.
    first_heading = next(
        line for line in (built[name].folder / "README.md").read_text().splitlines() if line.startswith("# ")
    )
    assert first_heading in description
    targets = [target for pattern in LINK_TARGETS for target in pattern.findall(description)]
    assert targets, f"{name}'s README has no links; the check below would prove nothing"
    relative = sorted({target for target in targets if not ABSOLUTE.match(target)})
    assert not relative, f"{name}'s long description keeps relative links PyPI cannot follow: {relative}"
