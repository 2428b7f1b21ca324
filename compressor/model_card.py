"""`README.md` model cards: YAML front matter (licence, data and its licence, metrics with the
evaluation protocol, intended use) and a short body, for model and artifact directories.
Metric values are in the Hugging Face `model-index` format (task, dataset and split, metrics), so
the Hub and `huggingface_hub.ModelCard(...).data.eval_results` read them.

The card only restates what the directory's own files record (config, summaries, manifest);
fields it cannot know are left out rather than guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from compressor.artifact import CARD_FILE

# MovieLens (every size) is GroupLens' research licence: no commercial use without permission,
# redistribution only under the same terms. Weights fitted to it inherit those limits, so the
# card does not claim the code's Apache-2.0 licence for them.
MOVIELENS_LICENSE = {
    "name": "MovieLens (GroupLens Research) usage licence",
    "terms": "research and education use only; no commercial use without permission from "
             "GroupLens; redistribution only under the same terms; cite Harper & Konstan (2015)",
    "link": "https://files.grouplens.org/datasets/movielens/ml-latest-small-README.html",
}
# Names (or folder names) of MovieLens releases, and slices of them such as `ml-latest-small-tiny`.
MOVIELENS = re.compile(r"^ml-(latest-small|latest|\d+[mk])(\b|-)")

PROTOCOL = {
    "split": "leave-one-out by time: each user's last item is the test target, the one before "
             "it the validation target, the rest is training",
    "ranking": "full ranking over the whole item catalogue (no sampled negatives)",
    "seen_items": "excluded: items already in the user's history are never ranked",
    "ties": "count against the model",
    "metrics": "NDCG@k, HR@k, MRR, averaged over users; coverage@10 over the catalogue",
}
INTENDED_USE = (
    "Next-item recommendation over the catalogue it was trained on (item ids in item_vocab.json), "
    "for research on compressing transformer recommenders. Not evaluated for fairness, for "
    "cold-start users or items, or for data other than the training set's."
)
METRIC_KEYS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "mrr", "coverage@10")


def dataset_license(dataset: str | None) -> dict:
    if dataset and MOVIELENS.match(Path(str(dataset)).name):
        return dict(MOVIELENS_LICENSE)
    return {"name": "unknown", "terms": "the training data's own terms apply; check them before use"}


METRIC_NAMES = {"ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10", "hr@5": "HR@5", "hr@10": "HR@10", "mrr": "MRR",
                "coverage@10": "catalogue coverage@10"}
TASK = {"type": "sequential-recommendation", "name": "Next-item recommendation (full ranking over the catalogue)"}


def _metrics(metrics: dict | None) -> dict[str, float]:
    return {k: round(float(metrics[k]), 6) for k in METRIC_KEYS
            if metrics and isinstance(metrics.get(k), int | float)}


def model_index(name: str, dataset: str | None, metrics: dict[str, float], split: str) -> list[dict]:
    """Hugging Face `model-index` front matter (what the Hub and `huggingface_hub.ModelCard` read
    as evaluation results): one result, this task on this dataset's split, one entry per metric."""
    data = Path(str(dataset)).name if dataset else "unknown"
    return [{"name": name, "results": [{
        "task": dict(TASK),
        "dataset": {"type": data, "name": data, "split": split},
        "metrics": [{"type": k, "value": v, "name": f"{METRIC_NAMES[k]} ({split} split)", "verified": False}
                    for k, v in metrics.items()],
    }]}]


def card_metrics(card: dict) -> tuple[dict[str, float], str | None]:
    """({metric: value}, split) of a card's front matter, from its `model-index`."""
    for entry in card.get("model-index") or []:
        for result in entry.get("results") or []:
            values = {m["type"]: m["value"] for m in result.get("metrics") or []}
            if values:
                return values, (result.get("dataset") or {}).get("split")
    return {}, None


def build_card(kind: str, architecture: str, parameters: int, num_layers: int, hidden_size: int,
               num_items: int, dataset: str | None, metrics: dict | None = None,
               metrics_split: str = "valid", base_model: str | None = None,
               teacher_layers: list[int] | None = None, data_fingerprint: str | None = None,
               extra: dict | None = None, library: str = "transformers") -> str:
    """The card's text: YAML front matter between `---` lines, then Markdown."""
    lic = dataset_license(dataset)
    front: dict = {
        # The code is Apache-2.0; the weights carry their training data's terms (see dataset_license).
        "license": "other",
        "license_name": "same terms as the training data" if lic["name"] == "unknown" else lic["name"],
        "library_name": library,
        "tags": ["recommender-system", "sequential-recommendation", "recsys-compressor", kind],
    }
    if base_model:
        front["base_model"] = base_model
    front["datasets"] = [dataset] if dataset else []
    front["dataset_license"] = lic
    if data_fingerprint:
        front["data_fingerprint"] = data_fingerprint
    front["model"] = {"kind": kind, "architecture": architecture, "parameters": int(parameters),
                      "num_layers": int(num_layers), "hidden_size": int(hidden_size), "num_items": int(num_items),
                      **({"teacher_layers": list(teacher_layers)} if teacher_layers else {})}
    values = _metrics(metrics)
    front["metrics"] = list(values)  # metric ids, as the Hub's card metadata expects; values below
    if values:
        front["model-index"] = model_index(
            f"recsys-compressor {kind}: {architecture}, {int(num_layers)} layers", dataset, values, metrics_split)
    front["evaluation_protocol"] = PROTOCOL
    front["intended_use"] = INTENDED_USE
    front.update(extra or {})
    body = [
        f"# {kind} recommender ({architecture}, {int(num_layers)} layers, {int(parameters):,} parameters)",
        "",
        "Written by `recsys-compressor`. A history of item tokens (left-padded) goes in; the final "
        "hidden state scores every item of the catalogue.",
        "",
        f"- Data: {dataset or 'unknown'}. Licence of the data: {lic['terms']}.",
        f"- Metrics ({metrics_split} split): " + (", ".join(f"{METRIC_NAMES[k]} {v:.4f}" for k, v in values.items())
                                                 or "none recorded in this directory") + ".",
        f"- Protocol: {PROTOCOL['split']}; {PROTOCOL['ranking']}; seen items {PROTOCOL['seen_items'].split(':')[0]}.",
        f"- Intended use: {INTENDED_USE}",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"


def read_front_matter(path: str | Path) -> dict:
    """The YAML between the first two `---` lines of a card."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}


def artifact_card(fields: dict) -> str:
    """The card of an artifact directory, from its manifest fields. Metrics: the manifest's own,
    else the validation metrics on the source model directory's card."""
    metrics, split = fields.get("metrics") or None, "test"
    if not metrics:
        split = "valid"
        src = Path(str(fields.get("source_model_dir", ""))) / CARD_FILE
        try:
            metrics, split = card_metrics(read_front_matter(src))
            split = split or "valid"
        except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
            metrics = None  # no card there (an older model directory): say nothing rather than guess
    recsys, parity = fields.get("recsys") or {}, (fields.get("parity") or {}).get("model.onnx", {})
    adapted = recsys.get("adapted_from")
    return build_card(
        kind=fields.get("kind", "model"), architecture=fields.get("architecture", "unknown"),
        parameters=fields.get("parameters", 0), num_layers=fields.get("num_layers", 0),
        hidden_size=fields.get("hidden_size", 0), num_items=fields.get("num_items", 0),
        dataset=(fields.get("data") or {}).get("name"), metrics=metrics, metrics_split=split,
        base_model=Path(adapted).name if adapted else None, teacher_layers=fields.get("teacher_layers"),
        data_fingerprint=(fields.get("data") or {}).get("fingerprint"), library="onnx",
        extra={"onnx_parity": {k: parity[k] for k in ("n", "max_abs_diff", "topk_agreement", "k") if k in parity}},
    )
