"""Quantization with a quality budget: the fastest graph that still ranks like the float one.

Every method in `QuantizeConfig.methods` (registry `METHODS`) quantizes the float graph; each
result is judged against the float graph on the same validation histories, as served (`hidden @
item_embeddings.T (+ bias)`, seen items and padding excluded):

- top-k agreement (mean overlap of the two top-10 lists) must be >= `min_topk_agreement`;
- validation NDCG@10 may fall by at most `max_ndcg_drop` of the float graph's (relative), with a
  paired bootstrap interval of the difference reported beside it.

Then all graphs are timed in one interleaved ONNX Runtime run (batch 1 latency, batch 64
throughput; `compressor.speed`), and the fastest passing graph at `rank_batch` is chosen. None
passing is a refusal (`QuantResult.refusal` says why), not an error.

`fisher_mixed` is Fisher-guided mixed precision: the graph's weight MatMuls are ranked by the
Fisher-weighted error the base method puts on their weights (`compressor.quantize_sensitivity`),
and the most sensitive are kept in float, as few as the budget allows (doubling, then bisection).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor import artifact as art
from compressor.atomic import atomic_write, atomic_write_json
from compressor.data import prepare
from compressor.data.protocol import Split, left_pad
from compressor.data.vocab import ItemVocab
from compressor.errors import CompressorError
from compressor.evaluate import METRICS, paired_bootstrap, target_ranks
from compressor.modeling import load_model
from compressor.quantize import (
    INT4_ACCURACY_LEVEL,
    INT4_BLOCK_SIZE,
    bf16_support,
    onnx_hidden,
    quantize_onnx,
    weight_matmuls,
)
from compressor.quantize_report import markdown, plot
from compressor.quantize_sensitivity import fisher_sensitivity, matmul_parameters
from compressor.speed import compare_latency, machine_info


@dataclass(frozen=True)
class Plain:
    """A method that is one quantizer call with fixed options."""

    quantizer: str  # key of compressor.quantize.QUANTIZERS
    per_channel: bool = True
    description: str = ""


PLAIN: dict[str, Plain] = {
    "int8_per_tensor": Plain("int8", False, "dynamic int8, one scale per weight tensor"),
    "int8": Plain("int8", True, "dynamic int8, one scale per output channel"),
    "int8_static": Plain("int8_static", True, "static QDQ int8, activations calibrated on validation histories"),
    "int4": Plain("int4", True, "weight-only int4 (MatMulNBits)"),
    "fp16": Plain("fp16", True, "float16 weights and activations, float32 in and out"),
}


class QuantizeConfig(BaseModel):
    """Which quantization methods to try and the quality budget the served one must meet."""

    model_config = ConfigDict(extra="forbid")
    methods: list[str] = Field(
        ["int8_per_tensor", "int8", "int8_static", "int4", "fp16", "fisher_mixed"],
        description="methods tried, in order: int8_per_tensor, int8 (per channel), int8_static, int4, fp16, "
        "fisher_mixed")
    min_topk_agreement: float = Field(0.95, ge=0, le=1, description="mean top-k overlap with the float graph on "
                                      "validation histories a quantized graph needs")
    max_ndcg_drop: float = Field(0.02, ge=0, le=1, description="largest fall of validation NDCG@10 accepted, "
                                 "relative to the float graph's")
    topk: int = Field(10, ge=1, description="k of the top-k agreement")
    users: int = Field(512, ge=1, description="validation users the budget is judged on")
    calibration_users: int = Field(128, ge=1, description="int8_static: validation users the activation ranges "
                                   "are calibrated on")
    calibration_batch: int = Field(32, ge=1, description="int8_static: histories per calibration batch")
    block_size: int = Field(INT4_BLOCK_SIZE, ge=16, description="int4: weights per scale along the input dimension "
                            "(power of 2)")
    accuracy_level: int = Field(INT4_ACCURACY_LEVEL, ge=0, le=4, description="int4: MatMulNBits compute type (0 unset, 1 fp32, "
                                "2 fp16, 3 bf16, 4 int8)")
    mixed_base: str = Field("int8", description="fisher_mixed: the method whose most sensitive MatMuls are "
                            "kept in float")
    mixed_max_float: float = Field(0.5, gt=0, le=1, description="fisher_mixed: largest share of the weight "
                                   "MatMuls kept in float before it gives up")
    fisher_samples: int = Field(128, ge=1, description="fisher_mixed: validation histories of the Fisher")
    fisher_batch_size: int = Field(16, ge=1, description="fisher_mixed: histories per Fisher batch")
    rank_batch: Literal[1, 64] = Field(1, description="batch size whose median latency decides the fastest")
    speed_rounds: int = Field(3, ge=1, description="interleaved timing rounds")
    speed_calls: int = Field(10, ge=1, description="calls per model, batch size and round")
    threads: int | None = Field(1, ge=1, description="ONNX Runtime intra-op threads while timing (None = all)")
    bootstrap_resamples: int = Field(1000, ge=100, description="paired bootstrap resamples of the NDCG@10 "
                                     "difference")
    seed: int = Field(0, description="validation users, calibration users and Fisher samples")

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(f"unknown quantization methods {unknown}; choose from {', '.join(METHODS)}")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size {v}: MatMulNBits takes a power of 2 (16, 32, 64, 128, ...)")
        return v

    @field_validator("mixed_base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v not in PLAIN:
            raise ValueError(f"mixed_base {v!r}: choose one of {', '.join(PLAIN)}")
        return v


@dataclass
class Search:
    """What every method's judge reads: the float graph and its answers on validation histories."""

    float_path: Path
    work: Path
    split: Split  # validation users the budget is judged on
    calibration: Split  # other validation users (int8_static)
    emb: np.ndarray
    bias: np.ndarray | None
    max_len: int
    cfg: QuantizeConfig
    model: object | None = None  # the torch model (fisher_mixed)
    log: Callable[[str], None] = print
    float_hidden: np.ndarray = field(init=False)
    float_top: np.ndarray = field(init=False)
    float_ndcg: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.float_hidden = onnx_hidden(self.float_path, self.split.histories, self.max_len)
        self.float_top, self.float_ndcg = self._rank(self.float_hidden)

    def _rank(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tops, ndcg = [], []
        for a in range(0, len(hidden), 256):
            h = self.split.histories[a : a + 256]
            scores = hidden[a : a + 256] @ self.emb.T
            if self.bias is not None:
                scores = scores + self.bias
            rank, _ = target_ranks(scores, h, self.split.targets[a : a + 256])  # masks seen items in place
            tops.append(np.argpartition(-scores, self.cfg.topk, axis=1)[:, : self.cfg.topk])
            ndcg.append(METRICS["ndcg@10"].fn(rank, 10))
        return np.concatenate(tops), np.concatenate(ndcg)

    def feeds(self) -> list[dict]:
        h, b = self.calibration.histories, self.cfg.calibration_batch
        out = []
        for a in range(0, len(h), b):
            ids, mask = left_pad(h[a : a + b], self.max_len)
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    def quantize(self, plain: Plain, dst: Path, exclude=()) -> Path:
        return quantize_onnx(self.float_path, dst, plain.quantizer, plain.per_channel, exclude,
                             self.feeds() if plain.quantizer == "int8_static" else None,
                             self.cfg.block_size, self.cfg.accuracy_level)

    def judge(self, path: Path) -> dict:
        """Agreement and NDCG@10 of the graph at `path` against the float graph; `passed`, and why not."""
        hidden = onnx_hidden(path, self.split.histories, self.max_len)
        top, ndcg = self._rank(hidden)
        k = self.cfg.topk
        agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top, self.float_top, strict=True)]))
        nf, nq = float(self.float_ndcg.mean()), float(ndcg.mean())
        floor = nf * (1 - self.cfg.max_ndcg_drop)
        why = []
        if not np.isfinite(hidden).all():
            why.append("non-finite outputs")
        if not agreement >= self.cfg.min_topk_agreement:
            why.append(f"top-{k} agreement {agreement:.4f} < {self.cfg.min_topk_agreement}")
        if not nq >= floor:
            why.append(f"validation NDCG@10 {nq:.4f} < {floor:.4f} (float {nf:.4f} less {self.cfg.max_ndcg_drop:.0%})")
        return {"topk_agreement": agreement, "ndcg@10_float": nf, "ndcg@10": nq,
                "bootstrap_ndcg@10": paired_bootstrap(ndcg, self.float_ndcg, self.cfg.bootstrap_resamples, self.cfg.seed),
                "max_abs_diff": float(np.abs(hidden - self.float_hidden).max()),
                "passed": not why, "why": "; ".join(why) or None}


# --- the methods: fn(search, name, dst) -> row (judge's figures + what stayed float) ------------------


def _plain(name: str) -> Callable[[Search, Path], dict]:
    def run(s: Search, dst: Path) -> dict:
        plain = PLAIN[name]
        path = s.quantize(plain, dst)
        return {"method": name, "description": plain.description, "kept_float": [], **s.judge(path)}

    return run


def _fisher_mixed(s: Search, dst: Path) -> dict:
    if s.model is None:
        raise CompressorError("fisher_mixed needs the torch model the graph was exported from")
    base = PLAIN[s.cfg.mixed_base]
    nodes = weight_matmuls(onnx.load(str(s.float_path), load_external_data=False))
    params = matmul_parameters(s.float_path, s.model)
    t0 = time.perf_counter()
    score = fisher_sensitivity(s.model, s.split, params, base.quantizer, s.max_len, base.per_channel,
                               s.cfg.block_size, s.cfg.fisher_samples, s.cfg.fisher_batch_size, s.cfg.seed)
    fisher_seconds = time.perf_counter() - t0
    # unmatched nodes rank last (no evidence they matter); ties broken by graph order
    order = sorted(nodes, key=lambda n: (-score.get(n, -1.0), nodes.index(n)))
    tries: dict[int, dict] = {}

    def attempt(k: int) -> dict:
        path = s.quantize(base, s.work / f"mixed_{k}.onnx", order[:k])
        row = s.judge(path)
        tries[k] = {**row, "path": path}
        s.log(f"[quantize] fisher_mixed: {k} of {len(order)} MatMuls in float: top-{s.cfg.topk} agreement "
              f"{row['topk_agreement']:.4f}, NDCG@10 {row['ndcg@10']:.4f} ({'pass' if row['passed'] else 'fail'})")
        return row

    cap = max(1, int(s.cfg.mixed_max_float * len(order)))
    lo, hi = -1, None  # lo: largest k known to fail; hi: smallest k known to pass
    k = 0
    while k <= cap:
        if attempt(k)["passed"]:
            hi = k
            break
        lo, k = k, (1 if k == 0 else 2 * k)
        if lo < cap < k:
            k = cap
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid)["passed"]:
            hi = mid
        else:
            lo = mid
    best = hi if hi is not None else max(tries, key=lambda t: (tries[t]["topk_agreement"], -t))
    shutil.move(tries[best].pop("path"), dst)
    for t in tries.values():
        t.pop("path", None)
    kept = order[:best]
    row = {"method": "fisher_mixed", "description": f"{s.cfg.mixed_base} with the Fisher-ranked most sensitive "
           f"MatMuls kept in float", "kept_float": kept, "kept_float_params": [params.get(n) for n in kept],
           "weight_matmuls": len(order), "fisher_seconds": round(fisher_seconds, 2),
           "sensitivity": {params.get(n, n): score.get(n) for n in order},
           "search": [{"float_nodes": t, "topk_agreement": r["topk_agreement"], "ndcg@10": r["ndcg@10"],
                       "passed": r["passed"]} for t, r in sorted(tries.items())],
           **{k: v for k, v in tries[best].items()}}
    if hi is None:
        row["why"] = f"{row['why']} (even with {best} of {len(order)} MatMuls in float; cap {cap})"
    if not kept:
        row["same_as"] = s.cfg.mixed_base  # nothing kept in float: the base method's graph, not a choice of its own
    return row


METHODS: dict[str, Callable[[Search, Path], dict]] = {
    **{name: _plain(name) for name in PLAIN}, "fisher_mixed": _fisher_mixed,
}


@dataclass
class QuantResult:
    doc: dict  # everything measured (quantization.json)
    graphs: dict[str, Path]  # method -> graph written
    chosen: str | None  # the fastest method within the budget
    refusal: str | None  # why none is chosen

    @property
    def chosen_path(self) -> Path | None:
        return self.graphs.get(self.chosen) if self.chosen else None


def graph_name(method: str) -> str:
    return f"model.{method}.onnx"


def search_quantization(float_path: str | Path, out_dir: str | Path, valid: Split, item_embeddings: np.ndarray,
                        item_bias: np.ndarray | None, max_len: int, cfg: QuantizeConfig | None = None,
                        model=None, log: Callable[[str], None] = print) -> QuantResult:
    """Run every method of `cfg` on the float graph, judge and time them all, choose the fastest
    within the budget. Graphs go to `out_dir/model.<method>.onnx`; a method that cannot run
    (e.g. fisher_mixed without `model`) is recorded with its error, not raised."""
    cfg = cfg or QuantizeConfig()
    float_path, out_dir = Path(float_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judged = valid.subset(cfg.users, cfg.seed)
    judged_users = set(judged.users)
    rest = [i for i, u in enumerate(valid.users) if u not in judged_users]
    calib_idx = rest if len(rest) >= cfg.calibration_users else list(range(len(valid)))
    pick = np.random.default_rng(cfg.seed + 1).permutation(calib_idx)[: cfg.calibration_users]
    calibration = Split(valid.name, [valid.users[i] for i in pick], [valid.histories[i] for i in pick],
                        valid.targets[pick])
    work = out_dir / ".quantize-work"
    work.mkdir(exist_ok=True)
    try:
        s = Search(float_path, work, judged, calibration, np.asarray(item_embeddings, np.float32),
                   item_bias, max_len, cfg, model, log)
        rows, graphs = {}, {}
        for name in cfg.methods:
            t0 = time.perf_counter()
            dst = out_dir / graph_name(name)
            try:
                rows[name] = METHODS[name](s, dst)
                graphs[name] = dst
            except CompressorError as e:
                rows[name] = {"method": name, "error": str(e), "passed": False, "why": str(e)}
            rows[name]["seconds"] = round(time.perf_counter() - t0, 2)
            r = rows[name]
            log(f"[quantize] {name}: " + (f"top-{cfg.topk} agreement {r['topk_agreement']:.4f}, NDCG@10 "
                f"{r['ndcg@10']:.4f} vs float {r['ndcg@10_float']:.4f}: {'within' if r['passed'] else 'outside'} "
                f"the budget" if "error" not in r else f"failed: {r['error']}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[quantize] timing {len(graphs) + 1} graphs ({cfg.speed_rounds} interleaved rounds)")
    timing = compare_latency({"float": float_path, **graphs}, judged.histories, max_len, (1, 64),
                             cfg.speed_rounds, cfg.speed_calls, cfg.threads)
    sizes = {"float": float_path.stat().st_size, **{n: p.stat().st_size for n, p in graphs.items()}}
    for name, t in timing.items():
        row = rows.setdefault(name, {"method": name, "kept_float": "everything", "passed": True, "why": None,
                                     "topk_agreement": 1.0, "ndcg@10": float(s.float_ndcg.mean()),
                                     "ndcg@10_float": float(s.float_ndcg.mean())})
        row.update({"file_bytes": sizes[name], "batch_1_ms": t["batch_1"]["ms_median"],
                    "batch_64_per_second": t["batch_64"]["per_second"],
                    "latency_speedup": timing["float"]["batch_1"]["ms_median"] / t["batch_1"]["ms_median"],
                    "throughput_ratio": t["batch_64"]["per_second"] / timing["float"]["batch_64"]["per_second"],
                    "size_ratio": sizes[name] / sizes["float"]})
    key = f"batch_{cfg.rank_batch}"
    # fisher_mixed with nothing in float is its base's graph again: timing noise must not pick the copy
    passing = [n for n in graphs if rows[n]["passed"] and rows[n].get("same_as") not in graphs]
    chosen = min(passing, key=lambda n: timing[n][key]["ms_median"]) if passing else None
    refusal = None if chosen else ("no quantized graph within the budget: " + "; ".join(
        f"{n}: {rows[n]['why']}" for n in cfg.methods))
    if chosen:
        log(f"[quantize] chosen: {chosen} ({rows[chosen]['latency_speedup']:.2f}x float's batch-1 speed, "
            f"top-{cfg.topk} agreement {rows[chosen]['topk_agreement']:.4f})")
    else:
        log(f"[quantize] refused: {refusal}")

    bf16_ok, bf16_why = bf16_support()
    doc = {"budget": {"min_topk_agreement": cfg.min_topk_agreement, "max_ndcg_drop": cfg.max_ndcg_drop,
                      "k": cfg.topk, "users": len(judged), "split": valid.name},
           "chosen": chosen, "refusal": refusal, "rank_by": key, "methods": rows,
           "bf16": {"runs": bf16_ok, "why": bf16_why}, "machine": machine_info(), "config": cfg.model_dump(),
           "timing_method": f"ONNX Runtime, {cfg.threads or 'all'} thread(s), real validation histories padded to "
                            f"{max_len}, {cfg.speed_rounds} interleaved rounds x {cfg.speed_calls} calls, median"}
    return QuantResult(doc, graphs, chosen, refusal)


def write_results(res: QuantResult, out_dir: str | Path, title: str = "Quantization") -> list[Path]:
    """quantization.json, quantization.md and quantization.png (agreement vs speed) in `out_dir`."""
    out_dir = Path(out_dir)
    png = plot({title: res.doc}, out_dir / "quantization.png")
    atomic_write_json(out_dir / "quantization.json", res.doc)
    atomic_write(out_dir / "quantization.md", "\n".join([f"# {title}", "", *markdown(res.doc, png.name)]))
    return [out_dir / "quantization.json", out_dir / "quantization.md", png]


def quantize_artifact(artifact_dir: str | Path, out_dir: str | Path, data=None, cfg: QuantizeConfig | None = None,
                      model_dir: str | Path | None = None, log: Callable[[str], None] = print) -> QuantResult:
    """The budgeted search on an artifact's float graph (`compressor quantize ARTIFACT`): validation
    histories of `data` (a name/path or RecData; None = ml-latest-small) in the artifact's vocabulary,
    its item embeddings; the torch model for fisher_mixed from `model_dir` (default: the manifest's
    `source_model_dir`, when it still exists). Writes the chosen graph and the results to `out_dir`;
    the other graphs are removed. A refusal writes the results and no graph."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = art.verify_artifact(artifact_dir, check_hashes=False)
    vocab = ItemVocab.load(artifact_dir)
    if data is None or isinstance(data, str | Path):
        data = prepare(data or "ml-latest-small", vocab=vocab)
    elif not data.vocab.same_as(vocab):
        raise CompressorError("the data's item vocabulary is not the artifact's")
    emb = np.load(artifact_dir / art.EMBEDDINGS)
    bias = np.load(artifact_dir / art.BIAS) if manifest.get("has_bias") else None
    model_dir = model_dir or manifest.get("source_model_dir")
    cfg = cfg or QuantizeConfig()
    wanted = "fisher_mixed" in cfg.methods and model_dir and Path(model_dir).is_dir()
    model = load_model(model_dir)[0] if wanted else None
    res = search_quantization(artifact_dir / art.MODEL_ONNX, out_dir, data.split("valid"), emb, bias,
                              int(manifest["max_len"]), cfg, model, log)
    for name, path in list(res.graphs.items()):
        if name != res.chosen:
            path.unlink(missing_ok=True)
    res.graphs = {n: p for n, p in res.graphs.items() if n == res.chosen}
    write_results(res, out_dir, f"Quantization of {artifact_dir.name} ({manifest.get('kind')})")
    return res
