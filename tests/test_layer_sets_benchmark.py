"""benchmarks.layer_sets on quality-run directories written here (nothing trained)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.layer_sets import compare, main
from compressor.evaluate import paired_bootstrap


def _run(tmp_path, name: str, layers: dict, per_user: dict[int, list[np.ndarray]], method: str = "fisher_ld"):
    d = tmp_path / name
    (d / "cells").mkdir(parents=True, exist_ok=True)
    (d / "common.json").write_text(json.dumps({"layers": {str(k): v for k, v in layers.items()}}))
    for k, seeds in per_user.items():
        for s, u in enumerate(seeds):
            cell = {"method": method, "depth": k, "seed": s, "valid": {"ndcg@10": float(u.mean()) + 0.01},
                    "test": {"ndcg@10": float(u.mean())}, "per_user_ndcg10": u.tolist()}
            (d / "cells" / f"{method}_d{k}_s{s}.json").write_text(json.dumps(cell))
        floor = {"method": "truncated", "depth": k, "seed": 0, "valid": {"ndcg@10": 0.002}, "test": {"ndcg@10": 0.001},
                 "per_user_ndcg10": [0.0] * len(seeds[0])}
        (d / "cells" / f"truncated_d{k}_s0.json").write_text(json.dumps(floor))
    return d


def test_sets_are_compared_per_depth_against_the_first(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = [rng.random(50) for _ in range(3)]
    b = [x + 0.1 for x in a]
    ra = _run(tmp_path, "a", {8: [0, 1], 4: [0]}, {8: a, 4: a})
    rb = _run(tmp_path, "b", {8: [0, 5]}, {8: b})
    doc = compare({"top_k": ra, "other": rb}, "fisher_ld")
    assert list(doc["depths"]) == ["8"]  # only depths every run has
    rows = doc["depths"]["8"]
    assert "minus_reference" not in rows["top_k"] and rows["other"]["layers"] == [0, 5]
    expected = paired_bootstrap(np.mean(b, axis=0), np.mean(a, axis=0))
    assert rows["other"]["minus_reference"]["mean_diff"] == pytest.approx(0.1)
    assert rows["other"]["minus_reference"] == expected
    assert rows["top_k"]["test_ndcg@10"][0] == pytest.approx(np.mean([x.mean() for x in a]))
    assert rows["top_k"]["truncated_valid_ndcg@10"] == 0.002
    out = tmp_path / "out"
    assert main(["--runs", f"top_k={ra}", f"other={rb}", "--out", str(out)]) == 0
    assert all((out / f"layer_sets.{ext}").stat().st_size > 0 for ext in ("json", "md", "png"))
    assert "+0.1000" in (out / "layer_sets.md").read_text()


def test_a_run_may_name_its_own_method_and_depths_can_be_chosen(tmp_path):
    """NAME=DIR@METHOD compares one method's variants with other methods' cells of another run."""
    rng = np.random.default_rng(1)
    a = [rng.random(40) for _ in range(2)]
    ra = _run(tmp_path, "variant", {8: [0, 1], 4: [0]}, {8: a, 4: a})
    rb = _run(tmp_path, "grid", {8: [0, 1], 4: [0]}, {4: [x - 0.05 for x in a]}, method="logit_kd")
    out = tmp_path / "out"
    assert main(["--runs", f"fisher_ld={ra}", f"logit_kd={rb}@logit_kd", "--depths", "4", "--out", str(out)]) == 0
    doc = json.loads((out / "layer_sets.json").read_text())
    assert list(doc["depths"]) == ["4"] and doc["methods"] == {"fisher_ld": "fisher_ld", "logit_kd": "logit_kd"}
    assert doc["depths"]["4"]["logit_kd"]["minus_reference"]["mean_diff"] == pytest.approx(-0.05)
    assert "| logit_kd | logit_kd |" in (out / "layer_sets.md").read_text()
    # the reference without cells at a depth: that depth is skipped, never compared against another run
    assert list(compare({"logit_kd": rb, "fisher_ld": ra}, "fisher_ld", {"logit_kd": "logit_kd"})["depths"]) == ["4"]


def test_bad_runs_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--runs", f"a={tmp_path / 'empty'}", f"b={tmp_path / 'empty'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "common.json" in err[0]
    assert main(["--runs", f"a={tmp_path / 'empty'}", "--out", str(tmp_path / "o")]) == 2
