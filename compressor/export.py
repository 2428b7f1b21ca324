"""Export a model directory to a verified ONNX artifact directory (layout: `compressor.artifact`).

What the graph computes (the one place this is defined):
  inputs   `input_ids` int64 (B, T) and `attention_mask` int64 (B, T): item-token histories,
           oldest first, LEFT-padded with token 0 (mask 0), so position T-1 is the newest item;
           B and T are dynamic, 1 <= T <= max_len.
  output   `hidden` float32 (B, H): the final hidden state at the newest position.
  scores   `hidden @ item_embeddings.T (+ item_bias)`, (B, V), computed outside the graph
           (numpy / Faiss) so retrieval scales to large catalogues; token 0 is padding.

An export is accepted only after ONNX Runtime reproduces what serving uses on real validation
histories: the ranking (top-k agreement) and the scores of the items it ranks, relative to each
history's spread of scores (thresholds in `ExportConfig`). The hidden state's relative difference
is measured too, as a diagnostic (and a gate only when `rtol` is set): one ill-conditioned
history can make it large while the ranking is untouched. Otherwise `CompressorError` says by
how much it failed and no directory is left behind.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor import __version__
from compressor import artifact as art
from compressor.data.protocol import RecData, left_pad, prepare
from compressor.data.vocab import ItemVocab
from compressor.errors import ArtifactError, CompressorError
from compressor.model_card import artifact_card
from compressor.modeling import (
    QueryEncoder,
    count_parameters,
    decoder_parts,
    load_model,
    model_max_len,
    recsys_meta,
)
from compressor.quantize_budget import QuantizeConfig, graph_name, search_quantization
from compressor.speed import ort_session

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "hidden"
EXPORTABLE_ATTENTION = ("sdpa", "eager")  # both export and match ORT with left padding
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GB: larger weights go to model.onnx.data


class ExportConfig(BaseModel):
    """How a model directory becomes an artifact directory."""

    model_config = ConfigDict(extra="forbid")
    score_rtol: float | None = Field(
        1e-2, ge=0, description="max |score_onnx - score_torch| over the items each history ranks (both "
        "graphs' top-k), relative to the standard deviation of that history's scores over the catalogue: "
        "what serving sees, scale-free (None = not judged); fp32 rounding stays far below it even on an "
        "LLM's worst history, a graph with one wrong weight matrix lands far above it (tests/test_export.py)")
    rtol: float | None = Field(
        None, ge=0, description="max |hidden_onnx - hidden_torch| per history, relative to that history's "
        "largest |hidden_torch|, accepted (None = reported, not judged: one ill-conditioned history can "
        "make it large while the ranking is unchanged)")
    atol: float | None = Field(None, ge=0, description="max absolute |hidden_onnx - hidden_torch| accepted "
                               "(None = not judged)")
    min_topk_agreement: float = Field(0.99, ge=0, le=1, description="mean top-k overlap ONNX vs PyTorch accepted")
    topk: int = Field(10, ge=1, description="k of the top-k agreement")
    parity_users: int = Field(256, ge=1, description="validation users the parity check runs on")
    batch_size: int = Field(64, ge=1, description="batch size of the parity check")
    opset: int | None = Field(None, description="ONNX opset; None = the exporter's default")
    attn: Literal["sdpa", "eager"] = Field("sdpa", description="attention implementation the graph is traced with")
    quantize: Literal["int8", "int8_per_tensor", "int8_static", "int4", "fp16", "fisher_mixed", "auto"] | None = Field(
        None, description="also write model.<method>.onnx, judged against the float graph by `quantization`'s "
        "budget; auto = try every method of `quantization.methods` and keep the fastest within the budget")
    serve_quantized: bool = Field(False, description="serving loads the quantized graph by default, if it is "
                                  "within the budget and passes the gate (else float is served: a refusal)")
    quantized_min_topk_agreement: float = Field(
        0.9, ge=0, le=1, description="the gate: top-k agreement with PyTorch the quantized graph needs when it is "
        "the one served")
    quantization: QuantizeConfig = Field(QuantizeConfig(), description="methods and quality budget of `quantize`")
    seed: int = 0


@dataclass
class ArtifactResult:
    path: Path
    manifest: dict

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]


def export_onnx(model: PreTrainedModel, path: str | Path, max_len: int, opset: int | None = None) -> Path:
    """Export `QueryEncoder(model)` to `path` with the dynamo exporter (dynamic batch and length)."""
    path = Path(path)
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in EXPORTABLE_ATTENTION:
        raise CompressorError(f"attention implementation {attn!r} does not export; load the model with "
                              f"attn in {EXPORTABLE_ATTENTION}")
    if max_len < 2:
        raise CompressorError(f"max_len {max_len}: the exporter needs sequences of at least 2")
    model.config.use_cache = False  # a recommender scores one history; it never generates
    device = next(model.parameters()).device
    model.cpu().eval()
    # Example sizes on dynamic dims must not be 0 or 1 (the tracer would specialise on them);
    # the second row is left-padded so the masking path is traced as served.
    t = min(max_len, 8)
    ids = torch.arange(1, 2 * t + 1, dtype=torch.int64).reshape(2, t) % model.config.vocab_size
    ids[ids == 0] = 1
    mask = torch.ones_like(ids)
    ids[1, : t // 2] = 0
    mask[1, : t // 2] = 0
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        torch.onnx.export(
            QueryEncoder(model).eval(), (ids, mask), str(path), dynamo=True,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=nbytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    except Exception as e:  # the exporter raises many types; the user needs the model and the cause
        raise CompressorError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    finally:
        model.to(device)
    return path


def stamp_onnx_metadata(path: Path, fields: dict) -> dict:
    """Record `fields` (plus the producer) in the graph's `metadata_props`, so a graph found on
    its own still says what made it; returns the effective opset and IR version for the manifest."""
    graph = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    props = {"producer": "recsys-compressor", "producer_version": __version__, "opset": opset,
             "ir_version": graph.ir_version, "inputs": [i.name for i in graph.graph.input],
             "outputs": [o.name for o in graph.graph.output], **fields}
    onnx.helper.set_model_props(graph, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.save(graph, str(path))
    return {"opset": opset, "ir_version": graph.ir_version, "metadata_props": sorted(props)}


def item_embeddings(model: PreTrainedModel) -> tuple[np.ndarray, np.ndarray | None]:
    """The output head as (V, H) float32 (row = token id) and its bias (V,) if it has one."""
    head = decoder_parts(model).head
    weight = head.weight.detach().float().cpu().numpy()
    bias = head.bias.detach().float().cpu().numpy() if getattr(head, "bias", None) is not None else None
    return np.ascontiguousarray(weight), bias


def parity_histories(data: RecData, n: int, max_len: int, seed: int = 0) -> list[np.ndarray]:
    """`n` real validation histories; every other one cut to its newest L items (L random in
    [1, max_len]) so short, heavily padded rows are checked as much as full ones."""
    split = data.split("valid").subset(n, seed)
    rng = np.random.default_rng(seed)
    out = []
    for i, h in enumerate(split.histories):
        out.append(h[-int(rng.integers(1, max_len + 1)):] if i % 2 else h)
    return out


def _topk(scores: np.ndarray, histories: list[np.ndarray], k: int, num_special: int) -> np.ndarray:
    """Top-k tokens per row as served: specials and seen items excluded."""
    scores = scores.copy()
    scores[:, :num_special] = -np.inf
    for i, h in enumerate(histories):
        scores[i, h] = -np.inf
    k = min(k, scores.shape[1] - num_special)
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def check_parity(
    onnx_path: str | Path,
    model: PreTrainedModel,
    histories: list[np.ndarray],
    max_len: int,
    atol: float | None,
    min_topk_agreement: float,
    k: int = 10,
    batch_size: int = 64,
    num_special: int = 1,
    rtol: float | None = None,
    score_rtol: float | None = None,
) -> dict:
    """Run the graph in ONNX Runtime and the model in PyTorch on the same left-padded histories.

    Returns the max abs difference of `hidden` (and of the scores), the relative difference of
    `hidden` (per history, over that history's largest |hidden|: max, median and 99th
    percentile), the relative score difference of the ranked items (per history, the largest
    |score difference| over both top-k lists, over the std of the history's scores), the mean
    top-k overlap, rows and padded rows checked, the thresholds and `passed` (a threshold of None
    is not judged)."""
    if not histories:
        raise CompressorError("parity check needs at least one history")
    session = ort_session(onnx_path)
    encoder = QueryEncoder(model).eval()
    device = next(model.parameters()).device
    weight, bias = item_embeddings(model)
    max_diff = max_score_diff = 0.0
    overlap, padded, rel_rows, score_rel_rows = [], 0, [], []
    for a in tqdm(range(0, len(histories), batch_size), desc="parity", leave=False):
        chunk = histories[a : a + batch_size]
        # Pad to the longest row of the batch, as serving does, so T varies between batches.
        ids, mask = left_pad(chunk, min(max_len, max(len(h) for h in chunk)))
        padded += int((mask[:, 0] == 0).sum())
        with torch.no_grad():
            ref = encoder(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu().numpy()
        got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
        err = np.abs(got - ref)
        diff = float(err.max())
        max_diff = max(max_diff, diff if np.isfinite(diff) else float("inf"))  # NaN must fail, not vanish
        rel_rows.append(err.max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-12))
        s_ref, s_got = ref @ weight.T, got @ weight.T
        if bias is not None:
            s_ref, s_got = s_ref + bias, s_got + bias
        max_score_diff = max(max_score_diff, float(np.abs(s_got - s_ref).max()))
        top_ref, top_got = _topk(s_ref, chunk, k, num_special), _topk(s_got, chunk, k, num_special)
        overlap += [len(set(r) & set(g)) / len(r) for r, g in zip(top_ref, top_got, strict=True)]
        ranked = np.concatenate([top_ref, top_got], axis=1)
        ranked_err = np.abs(np.take_along_axis(s_got, ranked, 1) - np.take_along_axis(s_ref, ranked, 1)).max(axis=1)
        spread = np.maximum(s_ref[:, num_special:].std(axis=1), 1e-12)
        score_rel_rows.append(ranked_err / spread)
    agreement = float(np.mean(overlap))
    rel, score_rel = _finite(np.concatenate(rel_rows)), _finite(np.concatenate(score_rel_rows))
    max_rel, max_score_rel = float(rel.max()), float(score_rel.max())
    return {
        "max_abs_diff": max_diff, "max_rel_diff": max_rel, "median_rel_diff": float(np.median(rel)),
        "p99_rel_diff": float(np.percentile(rel, 99)), "max_abs_diff_scores": max_score_diff,
        "max_score_rel_diff": max_score_rel, "median_score_rel_diff": float(np.median(score_rel)),
        "topk_agreement": agreement, "k": k, "n": len(histories),
        "padded_rows": padded, "atol": atol, "rtol": rtol, "score_rtol": score_rtol,
        "min_topk_agreement": min_topk_agreement,
        "passed": bool((atol is None or max_diff <= atol) and (rtol is None or max_rel <= rtol)
                       and (score_rtol is None or max_score_rel <= score_rtol)
                       and agreement >= min_topk_agreement),
    }


def _finite(x: np.ndarray) -> np.ndarray:
    """NaN counts as an infinite difference: a graph that yields NaN must fail, not vanish from a max."""
    return np.where(np.isfinite(x), x, np.inf)


def require_parity(parity: dict, what: str) -> None:
    """Raise with the measured figures against the thresholds when a graph fails its check."""
    fails = []
    if parity["atol"] is not None and not parity["max_abs_diff"] <= parity["atol"]:
        fails.append(f"max abs diff {parity['max_abs_diff']:.3g} > atol {parity['atol']:.3g}")
    if parity.get("rtol") is not None and not parity["max_rel_diff"] <= parity["rtol"]:
        fails.append(f"max relative diff {parity['max_rel_diff']:.3g} > rtol {parity['rtol']:.3g}")
    if parity.get("score_rtol") is not None and not parity["max_score_rel_diff"] <= parity["score_rtol"]:
        fails.append(f"ranked items' scores differ by {parity['max_score_rel_diff']:.3g} of a history's score "
                     f"spread > score_rtol {parity['score_rtol']:.3g}")
    if not parity["topk_agreement"] >= parity["min_topk_agreement"]:
        fails.append(f"top-{parity['k']} agreement {parity['topk_agreement']:.4f} < "
                     f"{parity['min_topk_agreement']:.4f}")
    if fails:
        raise CompressorError(f"{what} rejected: ONNX Runtime vs PyTorch on {parity['n']} validation "
                              f"histories: {'; '.join(fails)}; no artifact written")


def _resolve_data(data: RecData | str | Path | None, vocab: ItemVocab) -> RecData:
    if isinstance(data, RecData):
        if not data.vocab.same_as(vocab):
            raise ArtifactError("the data's item vocabulary is not the model's; prepare it with vocab=<the model's>")
        return data
    return prepare(data if data is not None else "ml-latest-small", vocab=vocab)


def _items_json(data: RecData, vocab: ItemVocab) -> list[dict]:
    meta = data.interactions.items.set_index("item")
    out = []
    for item in vocab.items:
        row = meta.loc[item] if item in meta.index else None
        out.append({"item_id": item, "title": str(row["title"]) if row is not None else str(item),
                    "genres": str(row["genres"]) if row is not None else ""})
    return out


def _versions() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _quantize(tmp: Path, model: PreTrainedModel, data: RecData, histories, max_len: int, cfg: ExportConfig,
              num_special: int) -> tuple[dict, dict, str | None]:
    """`cfg.quantize` on the float graph, judged by the budget (compressor.quantize_budget). Kept: the
    named method's graph (even outside the budget: evaluated and timed, not served), or with "auto"
    the fastest within the budget; it then meets the gate against PyTorch (ranking only: a quantized
    graph never meets the float tolerances). Returns (parity by file, the search's record, the file
    to serve or None: a refusal, recorded with its reason, not an error)."""
    qcfg = cfg.quantization if cfg.quantize == "auto" else cfg.quantization.model_copy(
        update={"methods": [cfg.quantize]})
    weight, bias = item_embeddings(model)
    work = tmp / ".quantize"
    try:
        res = search_quantization(tmp / art.MODEL_ONNX, work, data.split("valid"), weight, bias, max_len, qcfg,
                                  model, logging.getLogger("compressor").info)
        keep = res.chosen if cfg.quantize == "auto" else cfg.quantize
        parity, name = {}, graph_name(keep) if keep in res.graphs else None
        if name:
            shutil.move(res.graphs[keep], tmp / name)
            parity[name] = check_parity(tmp / name, model, histories, max_len, None, cfg.quantized_min_topk_agreement,
                                        cfg.topk, cfg.batch_size, num_special)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {**res.doc, "method": cfg.quantize, "file": name, "served": False}
    if cfg.serve_quantized and res.chosen is None:
        doc["refusal"] = res.refusal
    elif cfg.serve_quantized:
        try:
            require_parity(parity[name], f"quantized ({keep}) graph")
            doc["served"] = True
        except CompressorError as e:
            doc["refusal"] = str(e)
    return parity, doc, name if doc["served"] else None


def export_artifact(
    model_dir: str | Path,
    out_dir: str | Path,
    data: RecData | str | Path | None = None,
    cfg: ExportConfig | None = None,
    metrics: dict | None = None,
) -> ArtifactResult:
    """Export, verify and write the artifact directory `out_dir` atomically.

    `data` gives the validation histories, item metadata and known users (a RecData prepared with
    the model's vocabulary, or a name/path; None = the bundled ml-latest-small). `metrics` is
    stored as-is in the manifest. On any failure `out_dir` is left as it was."""
    cfg = cfg or ExportConfig()
    t0 = time.perf_counter()
    model, vocab = load_model(model_dir, attn=cfg.attn)
    data = _resolve_data(data, vocab)
    max_len = model_max_len(model)
    meta = recsys_meta(model)
    histories = parity_histories(data, cfg.parity_users, max_len, cfg.seed)
    with art.atomic_directory(out_dir) as tmp:
        export_onnx(model, tmp / art.MODEL_ONNX, max_len, cfg.opset)
        onnx_meta = stamp_onnx_metadata(tmp / art.MODEL_ONNX, {"data_fingerprint": data.interactions.fingerprint(), "teacher_layers": meta.teacher_layers, "kind": meta.kind or "teacher"})
        parity = check_parity(tmp / art.MODEL_ONNX, model, histories, max_len, cfg.atol,
                              cfg.min_topk_agreement, cfg.topk, cfg.batch_size, vocab.num_special, cfg.rtol,
                              cfg.score_rtol)
        require_parity(parity, f"export of {model_dir}")
        parity_all = {art.MODEL_ONNX: parity}
        quantization, served_quantized = None, None
        if cfg.quantize:
            parity_q, quantization, served_quantized = _quantize(tmp, model, data, histories, max_len, cfg,
                                                                 vocab.num_special)
            parity_all.update(parity_q)
        weight, bias = item_embeddings(model)
        np.save(tmp / art.EMBEDDINGS, weight)
        if bias is not None:
            np.save(tmp / art.BIAS, bias)
        vocab.save(tmp)
        art.write_json(tmp / art.ITEMS, _items_json(data, vocab))
        histories_json = {str(u): [vocab.item(t) for t in seq] for u, seq in data.sequences.items()}
        art.write_json(tmp / art.USER_HISTORIES, histories_json)
        onnx_files = {p.name: p.stat().st_size for p in sorted(tmp.glob("model*.onnx*"))}
        serve = served_quantized or art.MODEL_ONNX
        fields = {
            "kind": meta.kind or "teacher",
            "architecture": model.config.model_type,
            "num_layers": model.config.num_hidden_layers,
            "teacher_layers": meta.teacher_layers,
            "hidden_size": int(weight.shape[1]),
            "max_len": max_len,
            "vocab_size": vocab.size,
            "num_items": vocab.num_items,
            "num_special": vocab.num_special,
            "has_bias": bias is not None,
            "parameters": count_parameters(model),
            "onnx_files": onnx_files,
            "serve_model": serve,
            "io": {"inputs": list(INPUT_NAMES), "output": OUTPUT_NAME, "padding": "left", "pad_id": vocab.pad_id},
            "parity": parity_all,
            "quantization": quantization,  # methods tried, budget, chosen, served or the refusal (None: not asked)
            "onnx": onnx_meta,
            "metrics": metrics or {},
            "recsys": meta.to_json(),
            "source_model_dir": str(Path(model_dir).resolve()),
            "data": {"name": data.name, "fingerprint": data.interactions.fingerprint(),
                     "users": len(data.sequences)},
            "export_config": cfg.model_dump(mode="json"),
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        manifest = art.write_manifest(tmp, fields, card=artifact_card(fields))
    return ArtifactResult(Path(out_dir), manifest)
