"""Real query vectors for the retrieval benchmark: the exported teacher's encoding of sampled users'
histories (what the service searches with), written as a (Q, H) .npy.

    python benchmarks/results/retrieval_1e6/user_queries.py ARTIFACT_DIR OUT.npy [--users 1000]
"""

from __future__ import annotations

import argparse

import numpy as np

from serving.artifact import load_artifact
from serving.runtime import OnnxEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("out")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    art = load_artifact(args.artifact, verify=False)
    users = sorted(art.histories)
    pick = np.random.default_rng(args.seed).choice(len(users), min(args.users, len(users)), replace=False)
    enc = OnnxEncoder(art.onnx_path, art.max_len)
    tokens = [[t for t in (art.token(i) for i in art.histories[users[j]]) if t is not None] for j in sorted(pick)]
    queries = np.concatenate([enc.encode(tokens[a:a + 64]) for a in range(0, len(tokens), 64)])
    np.save(args.out, queries.astype(np.float32))
    print(f"{len(queries)} query vectors of dim {queries.shape[1]} from {args.artifact} -> {args.out}")


if __name__ == "__main__":
    main()
