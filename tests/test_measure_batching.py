"""benchmarks.measure_batching: both settings served by real `bentoml serve` processes (started and
stopped by benchmarks.processes), a few requests each, one Markdown row per setting and round."""

from __future__ import annotations

from benchmarks.measure_batching import SETTINGS, main


def test_both_settings_answer_every_request(tiny_artifact_dir, capsys):
    code = main([str(tiny_artifact_dir), "--requests", "6", "--concurrency", "2", "--rounds", "1",
                 "--sequential", "3", "--ready-timeout", "180"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "batching |" in line]
    assert [r[0].lstrip("| ") for r in rows] == list(SETTINGS)
    assert all(r[-1].rstrip(" |") == "0" for r in rows), out  # errors column


def test_a_missing_artifact_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "none"), "--rounds", "1", "--ready-timeout", "60"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("measure_batching: error:") and "no such artifact directory" in err
    assert len(err.splitlines()) == 1
