"""benchmarks.llm_recipe: recipes of one (tiny, local) pretrained teacher compared on one budget."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import llm_recipe
from compressor.config import load_config
from compressor.pipeline import RunConfig
from tests.test_pretrained import _fake_llm

CONFIG = {
    "data": {"name": "ml-latest-small", "max_users": 60},
    "teacher": {"max_len": 12, "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2, "recent_windows": 2}},
    "selection": {"keep": 1},
}


@pytest.fixture()
def config_file(tmp_path):
    cfg = {**CONFIG, "teacher": {**CONFIG["teacher"], "pretrained": str(tmp_path / "llm")}}
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _fake_llm(tmp_path / "llm", load_config(RunConfig, path, []).data.load())
    return path


def test_recipe_text_is_name_and_teacher_overrides():
    assert llm_recipe.parse_recipe("a:item_init=centered,train.lr=3e-4") == (
        "a", ["teacher.item_init=centered", "teacher.train.lr=3e-4"])
    for bad in ("no-colon", ":train.lr=1", "a:train.lr"):
        with pytest.raises(ValueError, match="recipe"):
            llm_recipe.parse_recipe(bad)


def test_recipes_train_on_one_budget_and_are_reused(tmp_path, config_file):
    out, work = tmp_path / "out", tmp_path / "work"
    recipes = dict(map(llm_recipe.parse_recipe, ["text:item_init=text", "centered:item_init=centered,train.lr=3e-3"]))
    doc = llm_recipe.run(str(config_file), recipes, out, work, ["teacher.train.epochs=2"])
    rows = {r["recipe"]: r for r in doc["recipes"]}
    assert set(rows) == {"text", "centered"}
    for r in rows.values():
        assert r["epochs_run"] == 2 and len(r["curve"]) == 2 and max(r["curve"]) == r["valid_ndcg@10"]
        assert r["vs_ease"] == pytest.approx(r["valid_ndcg@10"] / doc["ease"]["valid_ndcg@10"])
    # the shared budget and each recipe's overrides reached the teacher that trained
    saved = json.loads((work / "centered.json").read_text())["config"]
    assert saved["item_init"] == "centered" and saved["train"]["lr"] == 3e-3 and saved["train"]["epochs"] == 2
    assert rows["text"]["loss"] != rows["centered"]["loss"]
    assert (out / "llm_recipe.md").read_text().count("\n| ") == 3 and (out / "llm_recipe.png").stat().st_size
    assert not (work / "text.ckpt" / "checkpoint.pt").exists()  # finished: only the summary stays
    # the same recipe again is read back, not retrained
    stamp = (work / "text.json").stat().st_mtime_ns
    llm_recipe.run(str(config_file), {"text": recipes["text"]}, out, work, ["teacher.train.epochs=2"])
    assert (work / "text.json").stat().st_mtime_ns == stamp


def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, config_file, capsys):
    code = llm_recipe.main(["--config", str(config_file), "--out", str(tmp_path / "o"), "--work",
                            str(tmp_path / "w"), "--recipe", "x:item_init=words"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "item_init" in err
