"""Per-sample Fisher: the batched estimate (vmap over chunks) against the batch-size-1 loop.

    python -m benchmarks.fisher_speed --model runs/llm/models/teacher --samples 8 --chunks 1,4 \
        --out benchmarks/results/fisher_speed

Both compute the diagonal empirical Fisher of the same validation histories (the importance
stage's probe set); the loop is one forward and backward pass per history. Prints and writes the
seconds per sample of each and the largest relative difference of the per-layer traces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from compressor.data import prepare
from compressor.fisher import ProbeSet, last_item_loss, layer_traces
from compressor.modeling import decoder_parts, load_model, model_max_len


def loop_traces(model, probe: ProbeSet) -> list[float]:
    """tr(F_l) from one backward pass per history (the reference the batched estimate must equal)."""
    layers = decoder_parts(model).layers
    totals = np.zeros(len(layers))
    model.eval()
    for ids, mask, target in probe.batches(1):
        model.zero_grad(set_to_none=True)
        last_item_loss(model, ids, mask, target).backward()
        for i, layer in enumerate(layers):
            totals[i] += sum(float(p.grad.pow(2).sum()) for p in layer.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return (totals / len(probe)).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model directory (teacher or student)")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--chunks", default="1,8", help="vmap chunk sizes to time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="directory for fisher_speed.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab = load_model(args.model)
    data = prepare(args.data, vocab=vocab)
    probe = ProbeSet.from_data(data, model_max_len(model), args.samples, seed=0)
    t0 = time.perf_counter()
    reference = loop_traces(model, probe)
    rows = [{"method": "loop (batch size 1)", "seconds_per_sample": (time.perf_counter() - t0) / len(probe),
             "max_rel_diff": 0.0}]
    for chunk in (int(c) for c in args.chunks.split(",")):
        t0 = time.perf_counter()
        got = layer_traces(model, probe, batch_size=chunk, progress=False).traces
        rows.append({"method": f"vmap, chunk {chunk}", "seconds_per_sample": (time.perf_counter() - t0) / len(probe),
                     "max_rel_diff": float(np.max(np.abs(np.subtract(got, reference)) / np.abs(reference)))})
    params = sum(p.numel() for p in decoder_parts(model).layers.parameters())
    result = {"model": args.model, "decoder_parameters": params, "samples": len(probe),
              "threads": torch.get_num_threads(), "rows": rows}
    for r in rows:
        speedup = rows[0]["seconds_per_sample"] / r["seconds_per_sample"]
        print(f"{r['method']:<22} {r['seconds_per_sample']:8.3f} s/sample  x{speedup:5.2f}  "
              f"max rel diff {r['max_rel_diff']:.2e}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fisher_speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
