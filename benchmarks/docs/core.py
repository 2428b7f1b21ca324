"""Generated regions, the page context (links relative to the page) and number formatting."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
# docs/ reaches the results folders through this link (a symlink to ../benchmarks/results), so the
# site can link to and show the very files the tables come from.
DOCS_RESULTS = "docs/benchmark-results"

# A region is a block (the opener ends its line) or inline (a value inside a sentence, one line).
REGION = re.compile(
    r"(?P<open><!-- generated:(?P<name>[\w-]+)(?P<args>(?: [^\s>]+)*) -->)(?P<nl>\n?)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /generated:(?P=name)(?P=args) -->)",
    re.S,
)
# A list item's or quote's marker, which does not count as a word before an inline region.
LIST_MARK = re.compile(r"^\s*(?:[-*+>]|\d+[.)])\s+")
OPENER = re.compile(r"<!-- generated:([\w-]+)((?: [^\s>]+)*) -->")


class DocsError(Exception):
    """A page or results file the generator cannot render from: one line, exit code 2."""


@dataclass(frozen=True)
class Ctx:
    """Where a region is rendered: `page` is the page's path relative to the repository root."""

    page: str

    def href(self, repo_path: str) -> str:
        """A link from this page to a repository file; a results file is reached through
        docs/benchmark-results when the page is in docs/."""
        target = repo_path
        if self.page.startswith("docs/") and repo_path.startswith(RESULTS + "/"):
            target = DOCS_RESULTS + repo_path[len(RESULTS):]
        elif self.page.startswith("docs/") and repo_path.startswith("docs/"):
            target = repo_path
        return os.path.relpath(target, os.path.dirname(self.page) or ".").replace(os.sep, "/")

    def link(self, text: str, repo_path: str) -> str:
        """A Markdown link; on a docs page only files the site carries (docs/ and the results
        folders) are linked, a source file is named instead."""
        if self.page.startswith("docs/") and not (repo_path.startswith(RESULTS + "/") or repo_path.startswith("docs/")):
            return text
        return f"[{text}]({self.href(repo_path)})"

    def source(self, *repo_paths: str) -> str:
        """The line under a table that names the files it was rendered from."""
        links = ", ".join(self.link(f"`{p}`", p) for p in repo_paths)
        return f"<small>Rendered by `python -m benchmarks.docs` from {links}.</small>"


@cache
def load_json(repo_path: str) -> dict:
    path = ROOT / repo_path
    if not path.is_file():
        raise DocsError(f"{repo_path}: no such results file")
    return json.loads(path.read_text())


def read_text(repo_path: str) -> str:
    path = ROOT / repo_path
    if not path.is_file():
        raise DocsError(f"{repo_path}: no such file")
    return path.read_text()


# ----------------------------------------------------------------------------- formatting
MINUS = "\u2212"


def signed(x: float, digits: int = 4) -> str:
    s = f"{x:+.{digits}f}"
    return s.replace("-", MINUS)


def num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}".replace("-", MINUS)


def ci(d: dict | None, digits: int = 4, bold_if_excludes: bool = True) -> str:
    """A paired-bootstrap difference: mean [low, high], bold when the interval excludes 0."""
    if not d:
        return "—"
    s = f"{signed(d['mean_diff'], digits)} [{signed(d['ci_low'], digits)}, {signed(d['ci_high'], digits)}]"
    return f"**{s}**" if bold_if_excludes and d.get("excludes_zero") else s


def ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}×"


def pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def mean_std(v: list | None, digits: int = 4) -> str:
    if not v:
        return "—"
    return f"{num(v[0], digits)} ± {num(v[1], digits)}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("—" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- regions
def regions(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(name, args) of every region of a page; an opener without its closer is an error."""
    found = [(m["name"], tuple(m["args"].split())) for m in REGION.finditer(text)]
    if len(found) != len(OPENER.findall(text)):
        raise DocsError("a '<!-- generated:NAME ARGS -->' marker has no matching "
                        "'<!-- /generated:NAME ARGS -->' closer")
    return found


def render_page(text: str, page: str, renderers: dict) -> str:
    """The page with every region's body replaced by what its renderer gives now."""
    regions(text)  # checks the markers pair up
    ctx = Ctx(page)

    def body(m: re.Match) -> str:
        name, args = m["name"], tuple(m["args"].split())
        if not m["nl"]:
            before = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
            if not LIST_MARK.sub("", before).strip():
                raise DocsError(f"{page}: inline region {name} {' '.join(args)} begins its line: Markdown reads a "
                                "line that begins with an HTML comment as raw HTML (the paragraph breaks there and "
                                "links in it are not rendered); rewrap so a word comes before it")
        if name not in renderers:
            raise DocsError(f"{page}: unknown generated region {name!r} (known: {', '.join(sorted(renderers))})")
        try:
            out = renderers[name](ctx, *args).rstrip("\n")
        except DocsError as e:
            raise DocsError(f"{page}: region {name} {' '.join(args)}: {e}") from None
        if not m["nl"]:  # inline: stays inside its sentence
            if "\n" in out:
                raise DocsError(f"{page}: region {name} {' '.join(args)} is inline but renders several lines")
            return f"{m['open']}{out}{m['close']}"
        return f"{m['open']}\n{out}\n{m['close']}"

    return REGION.sub(body, text)
