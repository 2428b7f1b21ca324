"""Is the bf16-autocast gradient of the SmolLM2 teacher the fp32 one? (issue #28: the LLM job in fp32)

The configs/llm.yaml teacher (SmolLM2-135M adapted to ml-latest-small, item table from the item
texts, before any training) on the first training batches of its recipe (16 windows of 20 items):
the gradient of the next-item loss in fp32 (sdpa), in fp32 with eager attention, and under bf16
autocast, each against the same gradient computed in float64. Run once, 1 thread:

    OMP_NUM_THREADS=1 python benchmarks/results/precision_gradients/gradients.py

Writes gradients.json beside this file.
"""

import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.data import prepare
from compressor.data.protocol import training_windows, window_batches
from compressor.pretrained import adapt_llm
from compressor.teacher import next_item_loss
from compressor.training import cpu_has_native_bf16, set_seed

BATCHES = 4
PARTS = {"item table": ("embed_tokens", "lm_head"), "attention": ("self_attn",), "mlp": ("mlp",), "norms": ("norm",)}


def gradient(model, ids, mask, labels, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.config._attn_implementation = "eager" if mode == "fp32 eager" else "sdpa"
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = next_item_loss(model, ids, mask, labels)
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().flatten() for n, p in model.named_parameters()}


def compare(g: dict, ref: dict) -> dict:
    out = {}
    for part, keys in {"all": ("",), **PARTS}.items():
        names = [n for n in ref if any(k in n for k in keys)]
        a, b = torch.cat([g[n] for n in names]), torch.cat([ref[n] for n in names])
        out[part] = {"norm": a.norm().item(), "norm_fp64": b.norm().item(),
                     "cosine_vs_fp64": F.cosine_similarity(a, b, 0).item()}
    return out


def main() -> None:
    torch.set_num_threads(1)
    data = prepare("ml-latest-small", "auto")
    set_seed(0)
    model = adapt_llm("smollm2-135m", data, 20, "text")
    model.train()
    windows = training_windows(data.train_sequences(), 20, np.random.default_rng(0))
    batches = list(itertools.islice(window_batches(windows, 20, 16, np.random.default_rng(1), True), BATCHES))
    rows = []
    for i, batch in enumerate(batches):
        ids, mask, labels = (torch.from_numpy(x) for x in batch)
        got = {mode: gradient(model, ids, mask, labels, mode) for mode in ("fp32", "fp32 eager", "bf16")}
        model.double()
        loss64, ref = gradient(model, ids, mask, labels, "fp64")
        model.float()
        rows.append({"batch": i, "loss_fp64": loss64,
                     **{mode: {"loss": loss, **compare(g, ref)} for mode, (loss, g) in got.items()}})
        print(i, {mode: round(rows[-1][mode]["all"]["cosine_vs_fp64"], 4) for mode in got})
    doc = {"what": __doc__.split("\n\n")[1].replace("\n", " "),
           "machine": {"cpu": platform.processor() or platform.machine(), "native_bf16": cpu_has_native_bf16(),
                       "torch": torch.__version__, "threads": 1,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
           "batches": rows}
    Path(__file__).with_name("gradients.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
