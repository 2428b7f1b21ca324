"""Model cards: README.md front matter in every model and artifact directory the tools write."""

from __future__ import annotations

import json

import pytest

from compressor.model_card import (
    CARD_FILE,
    build_card,
    card_metrics,
    dataset_license,
    read_front_matter,
)

KEYS = {"license", "datasets", "dataset_license", "metrics", "model-index", "evaluation_protocol", "intended_use"}


def test_model_directory_card_names_data_licence_metrics_and_protocol(tiny_teacher_dir):
    card = read_front_matter(tiny_teacher_dir / CARD_FILE)
    assert KEYS <= set(card)
    assert card["datasets"] == ["ml-latest-small-tiny"] and "no commercial use" in card["dataset_license"]["terms"]
    summary = json.loads((tiny_teacher_dir / "training_summary.json").read_text())
    got, split = card_metrics(card)
    assert got["ndcg@10"] == pytest.approx(summary["best_valid"]["ndcg@10"], abs=1e-6)
    assert split == "valid" and card["metrics"] == list(got)
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
    assert card_metrics(card) == card_metrics(read_front_matter(tiny_teacher_dir / CARD_FILE))
    assert card["data_fingerprint"] == manifest["data"]["fingerprint"]
    assert card["onnx_parity"]["max_abs_diff"] == manifest["parity"]["model.onnx"]["max_abs_diff"]


def test_card_text_is_valid_front_matter_for_any_data():
    text = build_card("student", "llama", 1234, 2, 32, 100, "/data/my-shop", {"ndcg@10": 0.1, "users": 5},
                      "test", base_model="Qwen2.5-0.5B", teacher_layers=[0, 3])
    card = read_front_matter_text(text)
    assert card["base_model"] == "Qwen2.5-0.5B" and card["model"]["teacher_layers"] == [0, 3]
    assert card["metrics"] == ["ndcg@10"] and card_metrics(card) == ({"ndcg@10": 0.1}, "test")
    assert card["dataset_license"]["name"] == "unknown"
    assert dataset_license("ml-1m")["name"].startswith("MovieLens")
    assert dataset_license("/data/ml-latest-small")["name"].startswith("MovieLens")


def read_front_matter_text(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def test_metrics_are_hugging_face_model_index_that_the_hub_library_reads():
    """huggingface_hub parses the front matter into EvalResults: task, dataset, split, values."""
    from huggingface_hub import ModelCard

    text = build_card("student", "llama", 1234, 2, 32, 100, "ml-latest-small",
                      {"ndcg@10": 0.0692, "hr@10": 0.1361, "users": 610}, "test")
    card = ModelCard(text)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"ndcg@10", "hr@10"}
    r = results["ndcg@10"]
    assert (r.metric_value, r.dataset_type, r.dataset_split, r.task_type) == \
        (0.0692, "ml-latest-small", "test", "sequential-recommendation")
    assert r.verified is False
    assert card.data.model_name.startswith("recsys-compressor student")
    # the card round-trips through the library unchanged in what it says
    again = ModelCard(str(card))
    assert [(e.metric_type, e.metric_value) for e in again.data.eval_results] == \
        [(e.metric_type, e.metric_value) for e in card.data.eval_results]


def test_a_card_without_metrics_has_no_model_index():
    card = read_front_matter_text(build_card("teacher", "llama", 10, 1, 8, 5, None))
    assert "model-index" not in card and card["metrics"] == [] and card_metrics(card) == ({}, None)
