"""benchmarks.scaling on tiny sizes: synth + the job as measured subprocesses, stage windows,
growth exponents, the three results files."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

from benchmarks.scaling import ScalingConfig, _stage_rows, exponents, main, run


def test_exponents_are_log_log_slopes_between_sizes():
    rows = [{"items": 10, "stages": {"a": {"seconds": 1.0}, "b": {"seconds": 2.0}}},
            {"items": 100, "stages": {"a": {"seconds": 10.0}, "b": {"seconds": 200.0}}},
            {"items": 1000, "stages": {"a": {"seconds": 10.0}}}]
    e = exponents(rows, "seconds")
    assert e["a"] == [1.0, 0.0] and e["b"][0] == 2.0 and e["b"][1] is None


def test_a_stage_gets_the_peak_sampled_inside_its_window(tmp_path):
    (tmp_path / "stages").mkdir()
    end = 1_000_000.0
    for name, seconds, finished in (("teacher", 10.0, end), ("evaluate", 5.0, end + 20)):
        rec = {"seconds": seconds, "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds")}
        (tmp_path / "stages" / f"{name}.json").write_text(json.dumps(rec))
    samples = [(end - 8, 3 * 2**30), (end - 1, 5 * 2**30), (end + 10, 9 * 2**30), (end + 17, 2 * 2**30)]
    rows = _stage_rows(tmp_path, samples)
    assert rows["teacher"] == {"seconds": 10.0, "peak_rss_gib": 5.0}  # not the 9 GiB between the stages
    assert rows["evaluate"]["peak_rss_gib"] == 2.0


def test_tiny_sizes_end_to_end_with_the_job_refused_by_the_memory_check(tmp_path):
    """A tiny synthetic set; the job's memory check refuses it at once (what a too-large catalogue
    gets), which the results record and the table states; no stage ran. (A finished tiny job
    costs a minute, mostly ONNX export: the stage windows are tested above instead.)"""
    out, work = tmp_path / "out", tmp_path / "work"
    code = main(["--items", "30", "--interactions-per-item", "10", "--interactions-per-user", "10",
                 "--out", str(out), "--work", str(work), "data.memory_budget_gib=0.000001"])
    assert code == 0
    doc = json.loads((out / "scaling.json").read_text())
    (r,) = doc["sizes"]
    assert (r["items"], r["users"], r["interactions"]) == (30, 30, 300)
    # a tiny synth exits within a sampling interval or two: its sampled peak is small but measured
    assert r["synth"]["seconds"] > 0 and r["synth"]["peak_rss_gib"] > 0
    assert r["job"]["returncode"] == 2 and "stage needs about" in r["job"]["refused"]
    assert r["stages"] == {}
    md = (out / "scaling.md").read_text()
    assert "job refused (exit 2)" in md and "teacher.train.recent_windows=1" in md
    assert (out / "scaling.png").stat().st_size > 1000
    assert (work / "items-30" / "data" / "interactions.parquet").exists()


def test_sizes_measured_earlier_with_the_same_settings_are_kept():
    cfg = ScalingConfig(items=[10, 20], work="/nonexistent")  # nothing is measured: both sizes are kept
    earlier = {"config": {**cfg.model_dump(), "items": [10, 20, 40]},
               "sizes": [{"items": n, "stages": {"teacher": {"seconds": n / 10}}} for n in (10, 20, 40)]}
    doc = run(cfg, earlier)
    assert [r["items"] for r in doc["sizes"]] == [10, 20] and doc["exponent_seconds"]["teacher"] == [1.0]


def test_bad_arguments_are_one_line(capsys):
    assert main(["--items", "100", "--interactions-per-user", "1"]) == 2
    assert "interactions_per_user" in capsys.readouterr().err
    assert not math.isnan(ScalingConfig().timeout_minutes)
