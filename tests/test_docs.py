"""Citations stay inside the repository: what a comment or a page cites, a reader of the repository can open.

Comments and docs once cited "spec-facts A.7", sections of a fact sheet that lived beside the repository and not in
it. The facts now live in docs/ (model-conventions.md, seed-containers.md) and are cited by file and heading anchor
(``docs/model-conventions.md#roialign``). These tests fail when a citation of a file outside the repository comes
back, or when a cited docs page or anchor does not exist.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
THIS_FILE = Path(__file__).resolve()

# Fact sheets that were never part of the repository, and the aliases they defined for their sources.
OUTSIDE_SOURCES = ("spec-facts", "spec_facts", "real-parts-facts", "search-and-page-facts", "peers.md",
                   "shared/docs", "SM-NB")
# A bare section number of such a sheet, as in "(A.7)" or "(C.7-C.11)".
SECTION_NUMBER = re.compile(r"\((?:[A-G]\.\d+(?:\.\d+)?)(?:[-/,][A-G]?\.?\d+)*\)")
# docs/<page> as cited from code and pages, with an optional heading anchor (not part of a longer path or URL).
DOCS_CITATION = re.compile(r"(?<![\w./-])docs/([\w.-]+\.(?:md|yaml))(?:#([\w-]+))?")
# Markdown links to another page or a heading: [text](target.md#anchor), [text](#anchor).
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]*)\)")


def repository_text_files() -> list[Path]:
    """Every file git tracks or would track (untracked but not ignored), as text; binary files are left out."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True, timeout=60,
        ).stdout.decode()
        paths = sorted({REPO / name for name in listing.split("\0") if name})
    except (OSError, subprocess.SubprocessError):  # no git (e.g. an unpacked source archive): walk the tree
        skipped = {".venv", ".git", "build", "dist", "out", "__pycache__", ".pytest_cache", ".ruff_cache",
                   ".hypothesis"}
        paths = sorted(p for p in REPO.rglob("*")
                       if p.is_file() and not skipped & set(p.relative_to(REPO).parts))
    return [p for p in paths if p.is_file() and _text(p) is not None]


@cache
def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped, spaces to hyphens, a
    ``-1``, ``-2``, ... suffix on repeats. Lines in fenced code blocks are not headings."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@cache
def anchors_of(page: Path) -> frozenset[str]:
    return frozenset(heading_anchors(page.read_text()))


def citation_problems(path: Path, text: str) -> list[str]:
    """What is wrong with the citations in one file's text (empty when nothing is)."""
    where = path.relative_to(REPO)
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for name in OUTSIDE_SOURCES:
            if name in line:
                problems.append(f"{where}:{number} cites {name!r}, which is not in the repository: {line.strip()}")
        for section in SECTION_NUMBER.findall(line):
            problems.append(f"{where}:{number} cites section {section} of a document outside the repository")
        for page, anchor in DOCS_CITATION.findall(line):
            target = DOCS / page
            if not target.is_file():
                problems.append(f"{where}:{number} cites docs/{page}, which does not exist")
            elif anchor and target.suffix == ".md" and anchor not in anchors_of(target):
                problems.append(f"{where}:{number} cites docs/{page}#{anchor}: no such heading in docs/{page}")
    if path.suffix == ".md":
        for number, line in enumerate(text.splitlines(), start=1):
            for link in MARKDOWN_LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...
                    continue
                file_part, _, anchor = link.partition("#")
                target = (path.parent / file_part).resolve() if file_part else path
                if not target.exists():
                    problems.append(f"{where}:{number} links to {link}, which does not exist")
                elif anchor and target.suffix == ".md" and anchor not in anchors_of(target):
                    problems.append(f"{where}:{number} links to {link}: no such heading in {target.name}")
    return problems


def test_no_citation_of_documents_outside_the_repository_and_every_cited_anchor_exists():
    files = repository_text_files()
    assert any(p.name == "model-conventions.md" for p in files)  # the scan sees the docs it checks against
    problems = [problem for path in files if path != THIS_FILE for problem in citation_problems(path, _text(path))]
    assert not problems, "\n".join(problems)


def test_the_code_cites_the_conventions_pages():
    """The modules that implement the conventions point at their sections (a reader finds the source there)."""
    cited = {
        "maskrcnn_serving/modeling/anchors.py": "docs/model-conventions.md#anchors",
        "maskrcnn_serving/modeling/paste.py": "docs/model-conventions.md#paste",
        "maskrcnn_serving/modeling/preprocess.py": "docs/model-conventions.md#preprocessing",
        "maskrcnn_serving/modeling/tf_ops.py": "docs/model-conventions.md#per-class-nms",
        "maskrcnn_serving/encoding.py": "docs/seed-containers.md#legacy-rle",
    }
    for module, citation in cited.items():
        assert citation in (REPO / module).read_text(), f"{module} should cite {citation}"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("# the seed's RLE (spec-facts A.7)", "'spec-facts'"),
        ('"""Anchors (C.4)."""', "section (C.4)"),
        ("see ../shared/docs/peers.md", "'shared/docs'"),
        ("# docs/model-conventions.md#no-such-heading", "no such heading"),
        ("# docs/no-such-page.md", "does not exist"),
    ],
)
def test_a_reintroduced_outside_citation_is_caught(text, complaint):
    problems = citation_problems(REPO / "maskrcnn_serving" / "example.py", text)
    assert any(complaint in p for p in problems), problems


def test_valid_citations_pass():
    text = "\n".join([
        "# docs/model-conventions.md#roialign",
        "# docs/seed-containers.md#legacy-rle, docs/openapi.yaml",
        "# https://github.com/open-mmlab/mmdeploy/blob/main/docs/en/03-benchmark/benchmark.md",
    ])
    assert citation_problems(REPO / "maskrcnn_serving" / "example.py", text) == []


def test_heading_anchors_follow_github():
    page = "\n".join(["# Title", "## On a GPU: `benchmarks/gpu_check.sh`", "### Cost per 1,000 images", "```",
                      "# not a heading", "```", "## Title"])
    assert heading_anchors(page) == {"title", "on-a-gpu-benchmarksgpu_checksh", "cost-per-1000-images", "title-1"}
