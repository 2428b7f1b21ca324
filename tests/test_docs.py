"""The documentation generator (benchmarks/docs): committed pages match what the results files
and the code render, and the machinery that guarantees it works."""

from __future__ import annotations

import json

import pytest

from benchmarks.docs import teachers
from benchmarks.docs.__main__ import RENDERERS, main, pages, stale_files
from benchmarks.docs.core import ROOT, Ctx, DocsError, ci, regions, render_page


def test_committed_pages_and_provenance_are_up_to_date(capsys):
    """What `python -m benchmarks.docs` renders now is what is committed (README, docs/,
    every results folder's provenance.json)."""
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_a_region_is_replaced_and_prose_is_kept():
    page = "intro\n<!-- generated:x a b -->\nold table\n<!-- /generated:x a b -->\noutro\n"
    out = render_page(page, "docs/p.md", {"x": lambda ctx, *args: f"new {' '.join(args)} on {ctx.page}"})
    assert out == "intro\n<!-- generated:x a b -->\nnew a b on docs/p.md\n<!-- /generated:x a b -->\noutro\n"
    assert render_page(out, "docs/p.md", {"x": lambda ctx, *a: f"new {' '.join(a)} on {ctx.page}"}) == out


def test_an_inline_region_stays_in_its_sentence():
    page = "reached <!-- generated:v k -->0.1<!-- /generated:v k --> on test\n"
    out = render_page(page, "docs/p.md", {"v": lambda ctx, k: "[0.0651](x.json)"})
    assert out == "reached <!-- generated:v k -->[0.0651](x.json)<!-- /generated:v k --> on test\n"
    with pytest.raises(DocsError, match="inline"):
        render_page(page, "docs/p.md", {"v": lambda ctx, k: "| a |\n| b |"})


@pytest.mark.parametrize("line", [
    "<!-- generated:v k -->0.1<!-- /generated:v k --> on test\n",
    "- <!-- generated:v k -->0.1<!-- /generated:v k --> on test\n",
    "reached\n  <!-- generated:v k -->0.1<!-- /generated:v k --> on test\n",
])
def test_an_inline_region_may_not_begin_its_line(line):
    """Markdown (and GitHub) read a line that begins with an HTML comment as raw HTML."""
    with pytest.raises(DocsError, match="begins its line"):
        render_page(line, "docs/p.md", {"v": lambda ctx, k: "[0.0651](x.json)"})


def test_a_range_and_a_ratio_are_read_from_their_file_and_linked():
    from benchmarks.docs.results import value_range, value_ratio

    ctx = Ctx("docs/guides/x.md")
    f = "benchmarks/results/teacher_seeds30/teacher_seeds.json"
    assert value_range(ctx, f, ".2fx", "seeds.1.vs_ease", "seeds.2.vs_ease") == \
        "[1.30–1.35×](../benchmark-results/teacher_seeds30/teacher_seeds.json)"
    assert value_ratio(ctx, f, "seeds.2.vs_ease", "seeds.2.vs_ease", ".1fx") == \
        "[1.0×](../benchmark-results/teacher_seeds30/teacher_seeds.json)"


def test_a_key_that_holds_dots_is_found():
    assert teachers.dig({"a": {"model.int8.onnx": {"x": [1, 2]}}}, "a.model.int8.onnx.x.1") == 2
    with pytest.raises(DocsError, match="no key"):
        teachers.dig({"a": 1}, "b")


def test_a_value_is_read_from_its_file_and_linked():
    from benchmarks.docs.results import json_value

    ctx = Ctx("docs/results/x.md")
    text = json_value(ctx, "benchmarks/results/teacher_seeds30/teacher_seeds.json", "seeds.1.vs_ease", ".3fx")
    assert text == "[1.297×](../benchmark-results/teacher_seeds30/teacher_seeds.json)"


def test_a_stale_page_is_reported(tmp_path):
    """--check's comparison: a committed file that differs from its rendering is stale."""
    (tmp_path / "a.md").write_text("same\n")
    (tmp_path / "b.md").write_text("old\n")
    assert stale_files({"a.md": "same\n", "b.md": "new\n", "c.md": "missing\n"}, tmp_path) == ["b.md", "c.md"]


@pytest.mark.parametrize("page, message", [
    ("<!-- generated:nope -->\n<!-- /generated:nope -->\n", "unknown generated region"),
    ("<!-- generated:x -->\nno closer\n", "no matching"),
    ("<!-- generated:x a -->\n<!-- /generated:x b -->\n", "no matching"),
])
def test_bad_markers_are_errors(page, message):
    with pytest.raises(DocsError, match=message):
        render_page(page, "README.md", {"x": lambda ctx, *a: ""})


def test_links_are_relative_to_the_page():
    assert Ctx("README.md").href("benchmarks/results/llm_job/report.json") == "benchmarks/results/llm_job/report.json"
    assert Ctx("docs/results/llm.md").href("benchmarks/results/llm_job/report.json") == \
        "../benchmark-results/llm_job/report.json"
    # a docs page names a source file (the site does not carry it) instead of linking to it
    assert Ctx("docs/reference/cli.md").link("`cli.py`", "compressor/cli.py") == "`cli.py`"
    assert Ctx("README.md").link("`cli.py`", "compressor/cli.py") == "[`cli.py`](compressor/cli.py)"


def test_intervals_are_bold_only_when_they_exclude_zero():
    assert ci({"mean_diff": 0.0202, "ci_low": 0.0034, "ci_high": 0.0376, "excludes_zero": True}) == \
        "**+0.0202 [+0.0034, +0.0376]**"
    assert ci({"mean_diff": -0.0012, "ci_low": -0.0114, "ci_high": 0.0094, "excludes_zero": False}) == \
        "\u22120.0012 [\u22120.0114, +0.0094]"


def test_every_results_folder_names_its_teacher_and_machine_field():
    folders = teachers.results_folders()
    assert set(folders) <= set(teachers.FOLDERS)
    for f in folders:
        doc = json.loads((ROOT / "benchmarks/results" / f / "provenance.json").read_text())
        assert doc["teacher"]["status"] in ("current", "retired", "none")
        assert "machine" in doc
        if doc["teacher"]["id"] is not None:
            assert doc["teacher"]["test_ndcg@10"] > 0


def test_a_current_teacher_whose_config_changed_is_an_error(monkeypatch):
    t = teachers.TEACHERS["small-8L-30ep"]
    monkeypatch.setitem(teachers.TEACHERS, "small-8L-30ep",
                        teachers.Teacher(t.description, "current", t.path, t.config, t.test, "configs/llm.yaml"))
    with pytest.raises(DocsError, match="marked current"):
        teachers.check_current()


def test_every_page_region_has_a_renderer():
    for page in pages():
        for name, _ in regions((ROOT / page).read_text()):
            assert name in RENDERERS, f"{page}: {name}"



def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
