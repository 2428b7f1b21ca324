"""The CLI's contract: JSON keys, and one-line errors with exit code 2 (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.cli import main

KEYS = {"ndcg@5", "ndcg@10", "hr@5", "hr@10", "mrr", "coverage@10", "users"}


@pytest.fixture(scope="module")
def tiny_csv_dir(tmp_path_factory):
    from tests.conftest import tiny_interactions

    inter = tiny_interactions(30)
    d = tmp_path_factory.mktemp("data")
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(d / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(d / "movies.csv", index=False)
    return d


def test_evaluate_baseline_writes_the_documented_keys(tiny_csv_dir, tmp_path, capsys):
    out = tmp_path / "pop.json"
    assert main(["evaluate", "--baseline", "mostpop", "--data", str(tiny_csv_dir), "--json", str(out)]) == 0
    assert KEYS <= set(json.loads(out.read_text()))


def test_train_teacher_then_evaluate(tiny_csv_dir, tmp_path):
    out = tmp_path / "teacher"
    code = main(["train-teacher", "--data", str(tiny_csv_dir), "--out", str(out), "num_layers=2",
                 "hidden_size=16", "num_heads=2", "intermediate_size=32", "max_len=10", "train.epochs=1"])
    assert code == 0
    assert main(["evaluate", str(out), "--data", str(tiny_csv_dir), "--split", "valid",
                 "--json", str(tmp_path / "m.json"), "--against", "mostpop", "--against", str(out)]) == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    assert KEYS <= set(doc)
    pop = main_json(["evaluate", "--baseline", "mostpop", "--data", str(tiny_csv_dir), "--split", "valid"],
                    tmp_path / "pop.json")
    vs_pop = doc["against"]["mostpop"]["ndcg@10"]
    assert vs_pop["other"] == pop["ndcg@10"]
    assert vs_pop["mean_diff"] == pytest.approx(doc["ndcg@10"] - pop["ndcg@10"])
    assert vs_pop["ci_low"] <= vs_pop["mean_diff"] <= vs_pop["ci_high"]
    itself = doc["against"][str(out)]["hr@10"]  # a model against itself: no difference at all
    assert itself["mean_diff"] == itself["ci_low"] == itself["ci_high"] == 0 and not itself["excludes_zero"]


def main_json(argv: list[str], path: Path) -> dict:
    assert main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--baseline", "mostpop", "--data", "/no/such/place"], "no such dataset"),
        (["evaluate", "/no/such/model", "--data", "ml-latest-small"], "no such model directory"),
        (["train-teacher", "--data", "ml-latest-small", "--out", "x", "num_layerz=2"], "num_layerz"),
        (["train-teacher", "--data", "ml-latest-small", "--out", "x", "--config", "/no/cfg.yaml"], "no such config"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_model_dir_without_vocabulary_exits_2(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["evaluate", str(tmp_path / "m"), "--data", "ml-latest-small"]) == 2
    assert "item_vocab.json" in capsys.readouterr().err


# --- bad inputs: one line on stderr, exit code 2, nothing left behind (issue #12 item 10) ---------


def _damaged(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "truncated_weights":
        w = dst / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif how == "corrupt_config":
        (dst / "config.json").write_text('{"model_type": "llama", ')
    elif how == "distill_out":  # a distillation output directory: the model is in student/
        shutil.rmtree(dst)
        shutil.copytree(src, dst / "student")
    return dst


def _one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("how, command, message", [
    ("truncated_weights", "evaluate", "could not load the model"),
    ("truncated_weights", "export", "could not load the model"),
    ("truncated_weights", "prune", "could not load the model"),
    ("truncated_weights", "truncate", "could not load the model"),
    ("corrupt_config", "truncate", "config.json"),
    ("corrupt_config", "evaluate", "config.json"),
    ("distill_out", "evaluate", "did you mean"),
    ("distill_out", "export", "did you mean"),
])
def test_damaged_model_directories_are_one_line_errors(tiny_teacher_dir, tmp_path, capsys, how, command, message):
    bad = str(_damaged(tiny_teacher_dir, tmp_path / "model", how))
    out = tmp_path / "out"
    argv = {
        "evaluate": ["evaluate", bad, "--data", "ml-latest-small"],
        "export": ["export", bad, "--out", str(out)],
        "prune": ["prune", bad, "--out", str(out), "--heads", "0.5", "--scorer", "magnitude"],
        "truncate": ["truncate", bad, "--out", str(out), "--layers", "0,1"],
    }[command]
    err = _one_line_error(argv, capsys)
    assert message in err and str(bad) in err
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    (b"teacher:\n  num_layers: [1, 2\n", "not valid YAML at line"),
    (b"teacher:\n  num_layers: 2\n\xff\xfe\n", "not UTF-8"),
    (b"- just\n- a list\n", "must be a mapping"),
    (b"evaluate:\n  baselines: [mostpop, eaze]\n", "unknown baseline 'eaze'"),
    (b"teacher:\n  hidden_size: 30\n  num_heads: 4\n", "not divisible by num_heads"),
    (b"teacher:\n  num_heads: 4\n  num_kv_heads: 3\n", "not a multiple of num_kv_heads"),
    (b"selection:\n  keep: 8\n", "selection.keep 8"),
    (b"selection:\n  layers: [0, 99]\n", "out of range: the teacher has layers 0..7"),
    (b"selection:\n  layers: [3, 1]\n", "not in increasing order"),
    (b"teacher:\n  architecture: gpt2\nprune:\n  heads: 0.5\n", "GPT-2"),
    (b"teacher:\n  architecture: gpt2\nprune:\n  hidden: 0.5\n", "prune.hidden: GPT-2"),
    (b"data:\n  name: no-such-data\n", "no such dataset or path: no-such-data"),
])
def test_bad_run_configs_fail_at_load_and_leave_no_run_directory(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_bytes(text)
    out = tmp_path / "run"
    assert message in _one_line_error(["run", "--config", str(tmp_path / "c.yaml"), "--out", str(out)], capsys)
    assert not out.exists()


def test_unknown_forced_stage_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert "unknown stage 'bogus'" in _one_line_error(["run", "--out", str(out), "--force", "bogus"], capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["train-teacher", "--data", "ml-latest-small", "--out", "{tmp}/t", "hidden_size=30", "num_heads=4"],
     "not divisible by num_heads"),
    (["train-teacher", "--data", "ml-latest-small", "--out", "{tmp}/t", "--config", "{tmp}"], "cannot read"),
    (["run", "--out", "{tmp}/r", "teacher.num_layers=[1"], "not valid YAML"),
    (["evaluate", "--data", "ml-latest-small", "--baseline", "eaze"], "invalid choice"),
    (["prune", "x", "--out", "y", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["nope"], "invalid choice"),
])
def test_argument_and_override_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:  # argparse exits itself; the rest return 2
        raise SystemExit(main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


def test_bundled_config_names_resolve_and_the_version_prints(capsys):
    from compressor.config import load_config, resolve_config_path
    from compressor.pipeline import RunConfig

    assert resolve_config_path("smoke").name == "smoke.yaml"
    assert load_config(RunConfig, "default").teacher.num_layers == 8
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("compressor ")


def test_overrides_are_accepted_the_same_way_by_every_config_command(tmp_path):
    """Positional key=value (also after options) and --set land in the same list."""
    from compressor.cli import build_parser

    for command, head in [("run", []), ("train-teacher", ["--data", "d", "--out", "o"]),
                          ("prune", ["m", "--out", "o"]), ("export", ["m", "--out", "o"]),
                          ("analyze", ["m", "--out", "o"]),
                          ("distill", ["--teacher", "t", "--student", "s", "--data", "d", "--out", "o"])]:
        args, extra = build_parser().parse_known_args([command, *head, "a.b=1", "--set", "c=2", "d=3"])
        assert [*args.overrides, *extra] == ["a.b=1", "d=3"] and args.set_overrides == ["c=2"], command


def test_python_dash_m_compressor_and_quiet_flag(tiny_csv_dir, tmp_path):
    """`python -m compressor` is the CLI; -q keeps status off stderr, the JSON result stays on stdout."""
    base = [sys.executable, "-m", "compressor", "evaluate", "--baseline", "mostpop", "--data", str(tiny_csv_dir),
            "--against", "mostpop"]
    loud = subprocess.run(base, capture_output=True, text=True, timeout=120)
    quiet = subprocess.run([*base, "-q"], capture_output=True, text=True, timeout=120)
    assert loud.returncode == quiet.returncode == 0, loud.stderr
    assert json.loads(loud.stdout) == json.loads(quiet.stdout)
    assert "NDCG@10" in loud.stderr and quiet.stderr.strip() == ""


def test_distill_help_names_every_registered_method():
    from compressor.cli import DISTILL_METHODS_HELP
    from compressor.distill.losses import LOSSES

    assert DISTILL_METHODS_HELP.split(", ") == list(LOSSES)
