"""python -m benchmarks.docs [--check]: render the generated regions of README.md and docs/, the
results folders' provenance.json and docs/reference/openapi.json; --check writes nothing and exits
1 when a committed file differs from what it renders."""

from __future__ import annotations

import argparse
import difflib
import sys

from benchmarks.docs import jobs, reference, results, summary
from benchmarks.docs.core import DOCS_RESULTS, ROOT, DocsError, regions, render_page
from benchmarks.docs.teachers import check_current, provenance_files

RENDERERS = {**jobs.RENDERERS, **results.RENDERERS, **reference.RENDERERS, **summary.RENDERERS}


def pages() -> list[str]:
    """README.md, benchmarks/README.md and every Markdown page of docs/ (not the results folders
    it links to)."""
    found = ["README.md", "benchmarks/README.md"]
    docs = ROOT / "docs"
    if docs.is_dir():
        found += sorted(str(p.relative_to(ROOT)) for p in docs.rglob("*.md")
                        if not str(p.relative_to(ROOT)).startswith(DOCS_RESULTS))
    return found


def render_all() -> dict[str, str]:
    """{repository path: the content it should have}."""
    check_current()
    out = {}
    uses_http = False
    for page in pages():
        text = (ROOT / page).read_text()
        uses_http |= any(name == "http-reference" for name, _ in regions(text))
        out[page] = render_page(text, page, RENDERERS)
    out.update(provenance_files())
    if uses_http:
        out[reference.OPENAPI_JSON] = reference.openapi_file()
    return out


def stale_files(rendered: dict[str, str], root=ROOT) -> list[str]:
    """The paths whose file under `root` is missing or differs from its rendering."""
    out = []
    for path, text in rendered.items():
        target = root / path
        if not target.is_file() or target.read_text() != text:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    args = ap.parse_args(argv)
    try:
        rendered = render_all()
    except DocsError as e:
        print(f"benchmarks.docs: error: {e}", file=sys.stderr)
        return 2
    stale = stale_files(rendered)
    for path in stale:
        text = rendered[path]
        target = ROOT / path
        old = target.read_text() if target.is_file() else None
        if args.check:
            diff = difflib.unified_diff((old or "").splitlines(), text.splitlines(), f"{path} (committed)",
                                        f"{path} (rendered)", lineterm="", n=1)
            print("\n".join(list(diff)[:40]), file=sys.stderr)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if args.check and stale:
        print(f"benchmarks.docs: {len(stale)} file(s) differ from what the results and code render: "
              f"{', '.join(stale)}; run `python -m benchmarks.docs` and commit them", file=sys.stderr)
        return 1
    if not args.check:
        print(f"benchmarks.docs: {len(rendered)} files rendered, {len(stale)} updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
