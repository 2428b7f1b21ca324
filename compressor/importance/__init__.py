"""Layer importance: several estimators behind one interface, judged against ablation.

An estimator is `fn(model, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores` registered in
`IMPORTANCE` under its config/CLI name. `run_importance` runs the configured ones on validation
users (never test), ranks each against `ablation` (Spearman), records the layers every selection
strategy would keep, and `write_importance` saves `importance.json` plus the plots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.atomic import atomic_write_json
from compressor.data.protocol import RecData
from compressor.errors import ArtifactError, CompressorError
from compressor.fisher import ProbeSet, fisher_layer_weights, normalise
from compressor.importance.ablation import ablation, ablation_greedy, loss_and_ndcg
from compressor.importance.base import (
    ALL_METHODS,
    DEFAULT_METHODS,
    FisherOptions,
    ImportanceConfig,
    LayerScores,
    capture_layer_io,
    depth_bands,
    depth_shares,
    skip_layers,
)
from compressor.importance.fisher import fisher, gradient
from compressor.importance.plots import plot_importance
from compressor.importance.similarity import angular, attention, block_influence
from compressor.modeling import decoder_parts, pick_device
from compressor.select import SELECTION, top_k

IMPORTANCE_FILE = "importance.json"
# Estimators whose sums are split over the ranks under torchrun; the others run on rank 0 alone
# and every rank receives its result.
DATA_PARALLEL_METHODS = ("fisher",)
# The estimator `truncate --keep` uses when none is named. Fisher is the method under test; the
# measurement in benchmarks/layer_selection.py says whether another one should replace it.
DEFAULT_METHOD = "fisher"

Estimator = Callable[[PreTrainedModel, ProbeSet, ImportanceConfig], LayerScores]


def combine(components: dict[str, LayerScores], weights: dict[str, float]) -> LayerScores:
    """The hybrid: sum_m weight_m * normalised weights of method m (weights renormalised)."""
    total = sum(weights.values())
    L = len(next(iter(components.values())).scores)
    score = np.zeros(L)
    for name, w in weights.items():
        score += (w / total) * np.asarray(components[name].weights)
    detail = {"score": "weighted sum of the components' normalised weights",
              "components": {n: w / total for n, w in weights.items()}}
    return LayerScores("hybrid", score.tolist(), normalise(score), sum(components[n].seconds for n in weights),
                       max(components[n].samples for n in weights), detail)


def hybrid(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    parts = {name: IMPORTANCE[name](model, probe, cfg) for name in cfg.hybrid}
    return combine(parts, cfg.hybrid)


IMPORTANCE: dict[str, Estimator] = {
    "fisher": fisher,
    "gradient": gradient,
    "attention": attention,
    "block_influence": block_influence,
    "angular": angular,
    "ablation": ablation,
    "hybrid": hybrid,
    "ablation_greedy": ablation_greedy,
}
assert tuple(IMPORTANCE) == ALL_METHODS


def check_method(name: str) -> str:
    if name not in IMPORTANCE:
        raise CompressorError(f"unknown importance method {name!r}; choose one of {', '.join(IMPORTANCE)}")
    return name


def spearman(a, b) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k_overlap(a, b, k: int) -> float:
    """Share of the k highest-scoring layers of `a` that are also among the k highest of `b`.

    Where ablation concentrates on a few layers and leaves the rest at noise level, this says
    whether an estimator finds the layers a k-layer student would keep; Spearman over all layers
    then mostly ranks noise."""
    return len(set(top_k(a, k)) & set(top_k(b, k))) / k


def default_keep(num_layers: int) -> list[int]:
    """A 25%-depth student (at least one layer, fewer than all)."""
    return [min(max(1, round(num_layers / 4)), max(1, num_layers - 1))]


@dataclass
class ImportanceResult:
    num_layers: int
    samples: int
    methods: dict[str, LayerScores]
    spearman: dict[str, float | None]
    selections: dict[str, list[int]]
    config: dict
    overlap: dict[str, dict[str, float]] | None = None  # method -> {"k=2": share of ablation's top 2}

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "samples": self.samples,
            "methods": {n: {**s.to_json(), "spearman_vs_ablation": self.spearman.get(n),
                            "top_k_overlap_vs_ablation": (self.overlap or {}).get(n)}
                        for n, s in self.methods.items()},
            "selections": self.selections,
            "config": self.config,
        }


def selections_for(methods: dict[str, LayerScores], num_layers: int, keep: list[int]) -> dict[str, list[int]]:
    """What every strategy keeps under every method's scores, for each budget k (1 <= k < L)."""
    out = {}
    for k in keep:
        if not 1 <= k < num_layers:
            continue
        for strategy, fn in SELECTION.items():
            for name, s in methods.items():
                out[f"{strategy}/{name}/k={k}"] = fn(s.scores, k)
    return out


def run_importance(model: PreTrainedModel, data: RecData, cfg: ImportanceConfig, max_len: int,
                   progress: bool = True) -> ImportanceResult:
    """Run every configured estimator on validation users; the model is moved to `cfg.device`."""
    model.to(pick_device(cfg.device))
    L = len(decoder_parts(model).layers)
    split = data.split("valid")
    probe = ProbeSet.from_split(split, max_len, cfg.samples, cfg.seed)
    ground = ProbeSet.from_split(split, max_len, cfg.ablation_samples, cfg.seed)
    results: dict[str, LayerScores] = {}
    helpers: dict[str, LayerScores] = {}  # hybrid components that were not asked for
    todo = [m for m in cfg.methods if m != "hybrid"]
    if "hybrid" in cfg.methods:
        todo += [m for m in cfg.hybrid if m not in todo]
    for name in tqdm(todo, desc="importance", unit="method", disable=not progress or not dist.is_main()):
        args = (model, ground if name == "ablation" else probe, cfg)
        res = IMPORTANCE[name](*args) if name in DATA_PARALLEL_METHODS else dist.on_main(IMPORTANCE[name], *args)
        (results if name in cfg.methods else helpers)[name] = res
    if "hybrid" in cfg.methods:
        results["hybrid"] = combine({**helpers, **results}, cfg.hybrid)
    results = {m: results[m] for m in cfg.methods}
    truth = results.get("ablation")
    rho = {n: (spearman(s.scores, truth.scores) if truth is not None else None) for n, s in results.items()}
    keep = cfg.keep if cfg.keep is not None else default_keep(L)
    overlap = None if truth is None else {
        n: {f"k={k}": top_k_overlap(s.scores, truth.scores, k) for k in keep if 1 <= k < L}
        for n, s in results.items()}
    return ImportanceResult(L, len(probe), results, rho, selections_for(results, L, keep),
                            cfg.model_dump(mode="json"), overlap)


def write_importance(result: ImportanceResult, out_dir: str | Path) -> Path:
    """Write `importance.json` and the PNG plots into `out_dir`; returns the JSON path.
    Under torchrun rank 0 writes while the others wait."""
    return dist.on_main(_write_importance, result, out_dir)


def _write_importance(result: ImportanceResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_json()
    validate_importance(doc, "importance result")
    plot_importance(doc, out)
    path = out / IMPORTANCE_FILE
    atomic_write_json(path, doc, indent=2, default=None)
    return path


def validate_importance(doc, where: str) -> dict:
    """Check the shape of an importance document; ArtifactError naming the first problem."""
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: not a JSON object")
    L = doc.get("num_layers")
    if not isinstance(L, int) or L < 1:
        raise ArtifactError(f"{where}: num_layers must be a positive integer")
    methods = doc.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ArtifactError(f"{where}: no methods")
    for name, m in methods.items():
        if not isinstance(m, dict):
            raise ArtifactError(f"{where}: method {name!r} is not an object")
        for key in ("scores", "weights"):
            v = m.get(key)
            if (not isinstance(v, list) or len(v) != L
                    or not all(isinstance(x, int | float) and np.isfinite(x) for x in v)):
                raise ArtifactError(f"{where}: methods.{name}.{key} must be {L} finite numbers")
    sel = doc.get("selections", {})
    if not isinstance(sel, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) and 0 <= i < L for i in v) for v in sel.values()):
        raise ArtifactError(f"{where}: selections must map names to lists of layer indices < {L}")
    return doc


def load_importance(path: str | Path) -> dict:
    """Read and validate an `importance.json` (or the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / IMPORTANCE_FILE
    if not p.exists():
        raise ArtifactError(f"{p}: no such importance file")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p}: not valid JSON ({e})") from e
    return validate_importance(doc, str(p))


def method_scores(doc: dict, method: str) -> list[float]:
    """One method's per-layer scores from a loaded importance document."""
    if method not in doc["methods"]:
        raise CompressorError(f"importance file has no {method!r} scores (it has {', '.join(doc['methods'])})")
    return [float(x) for x in doc["methods"][method]["scores"]]


def layer_scores(source: str | Path | dict, method: str, num_layers: int) -> list[float]:
    """One method's per-layer scores from an importance.json (a path, its directory, or its parsed
    content), checked against the depth of the model they are for: what every reader (truncation,
    distillation's Fisher weights; pipeline and CLI alike) goes through."""
    doc = validate_importance(source, "importance") if isinstance(source, dict) else load_importance(source)
    if doc["num_layers"] != num_layers:
        where = "importance" if isinstance(source, dict) else str(source)
        raise CompressorError(f"{where}: {doc['num_layers']} layers scored, the teacher has {num_layers}")
    return method_scores(doc, method)


def estimate(model: PreTrainedModel, data: RecData, method: str, max_len: int,
             cfg: ImportanceConfig | None = None) -> LayerScores:
    """One method's scores (what `truncate --keep` uses when no importance file is given)."""
    check_method(method)
    cfg = (cfg or ImportanceConfig()).model_copy(update={"methods": [method], "keep": []})
    return run_importance(model, data, cfg, max_len, progress=False).methods[method]


__all__ = [
    "IMPORTANCE", "IMPORTANCE_FILE", "DEFAULT_METHOD", "ALL_METHODS", "DEFAULT_METHODS", "ImportanceConfig",
    "FisherOptions", "LayerScores", "ImportanceResult", "ProbeSet", "fisher_layer_weights",
    "combine", "spearman", "top_k_overlap", "depth_bands", "depth_shares", "run_importance", "write_importance", "load_importance", "validate_importance",
    "method_scores", "layer_scores", "estimate", "check_method", "capture_layer_io", "skip_layers", "loss_and_ndcg",
]
