"""The teacher's top-k for candidate distillation, exact vs HNSW (`distill.candidates_search`).

    OMP_NUM_THREADS=1 python benchmarks/results/scaling/topk_search.py benchmarks/results/scaling/topk_search.json

Random tables of 10^5 and 10^6 items x 32 dims (the smoke teacher's width) and 2,560 query rows
(a step of batch 128 x 20 positions), k = 100: seconds of one exact `teacher_topk` call, of building
the `HnswTopK` graph and of one search (median of 3), and the graph's recall of the exact top-k.
Random vectors are the hard case for a graph (no clusters); trained tables are easier.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from benchmarks.common import machine_info
from compressor.sampled_softmax import HnswTopK, teacher_topk


def _timed(fn, *args, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main(out: str) -> None:
    rows, dim, k = 2560, 32, 100
    doc = {"what": __doc__.split("\n\n")[2].replace("\n", " ").strip(), "machine": machine_info(),
           "threads": torch.get_num_threads(), "rows": rows, "dim": dim, "k": k, "sizes": {}}
    for items in (100_000, 1_000_000):
        g = torch.Generator().manual_seed(0)
        table, hidden = torch.randn(items + 1, dim, generator=g), torch.randn(rows, dim, generator=g)
        exact_s, exact = _timed(teacher_topk, hidden, table, k, repeats=1 if items > 100_000 else 3)
        t = time.perf_counter()
        graph = HnswTopK(table, None, k)
        build_s = time.perf_counter() - t
        search_s, found = _timed(graph, hidden)
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, exact, strict=True)]))
        doc["sizes"][str(items)] = {"exact_s": exact_s, "hnsw_build_s": build_s, "hnsw_search_s": search_s,
                                    "hnsw_recall_of_exact_topk": recall, "exact_over_hnsw": exact_s / search_s}
        print(items, doc["sizes"][str(items)], flush=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
