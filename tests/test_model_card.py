"""Model cards: README.md front matter in every model and artifact directory the tools write."""

from __future__ import annotations

import json

import pytest

from compressor.model_card import CARD_FILE, build_card, dataset_license, read_front_matter

KEYS = {"license", "datasets", "dataset_license", "metrics", "evaluation_protocol", "intended_use"}


def test_model_directory_card_names_data_licence_metrics_and_protocol(tiny_teacher_dir):
    card = read_front_matter(tiny_teacher_dir / CARD_FILE)
    assert KEYS <= set(card)
    assert card["datasets"] == ["ml-latest-small-tiny"] and "no commercial use" in card["dataset_license"]["terms"]
    summary = json.loads((tiny_teacher_dir / "training_summary.json").read_text())
    got = {m["name"]: m["value"] for m in card["metrics"]}
    assert got["ndcg@10"] == pytest.approx(summary["best_valid"]["ndcg@10"], abs=1e-6)
    assert {m["split"] for m in card["metrics"]} == {"valid"}
    assert "full ranking" in card["evaluation_protocol"]["ranking"]
    assert card["evaluation_protocol"]["seen_items"].startswith("excluded")
    assert card["model"]["kind"] == "teacher" and card["model"]["num_layers"] == 4
    assert "base_model" not in card  # trained from scratch: nothing to name


def test_artifact_card_is_in_the_manifest_and_inherits_the_model_metrics(tiny_artifact_dir, tiny_teacher_dir):
    from compressor.artifact import verify_artifact

    manifest = verify_artifact(tiny_artifact_dir)
    assert CARD_FILE in manifest["files"]  # hashed like every other file
    card = read_front_matter(tiny_artifact_dir / CARD_FILE)
    assert KEYS <= set(card) and card["library_name"] == "onnx"
    assert card["metrics"] == read_front_matter(tiny_teacher_dir / CARD_FILE)["metrics"]
    assert card["data_fingerprint"] == manifest["data"]["fingerprint"]
    assert card["onnx_parity"]["max_abs_diff"] == manifest["parity"]["model.onnx"]["max_abs_diff"]


def test_card_text_is_valid_front_matter_for_any_data():
    text = build_card("student", "llama", 1234, 2, 32, 100, "/data/my-shop", {"ndcg@10": 0.1, "users": 5},
                      "test", base_model="Qwen2.5-0.5B", teacher_layers=[0, 3])
    card = read_front_matter_text(text)
    assert card["base_model"] == "Qwen2.5-0.5B" and card["model"]["teacher_layers"] == [0, 3]
    assert card["metrics"] == [{"name": "ndcg@10", "value": 0.1, "split": "test"}]
    assert card["dataset_license"]["name"] == "unknown"
    assert dataset_license("ml-1m")["name"].startswith("MovieLens")
    assert dataset_license("/data/ml-latest-small")["name"].startswith("MovieLens")


def read_front_matter_text(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])
