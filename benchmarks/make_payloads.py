"""Fixed request payloads for the Locust load: known user ids and explicit test-split histories.

Usage:
    python -m benchmarks.make_payloads --artifact runs/default/student_artifact \
        --out benchmarks/payloads/ml-latest-small.json
    python -m benchmarks.make_payloads --data ml-latest-small --out benchmarks/payloads/ml-latest-small.json

With --artifact the users and histories come from its user_histories.json (full sequences,
oldest first); with --data from the data protocol. Either way an explicit history is the
user's test-split input: the full sequence without its last (test) item, as the offline
evaluation feeds the model. The same file drives teacher and student, so both answer the
same requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from compressor.atomic import atomic_write
from compressor.errors import ArtifactError, CompressorError
from compressor.ids import parse_id

FORMAT = "recsys-locust-payloads/1"
MIN_SEQUENCE = 3  # leave-one-out needs a valid and a test item after at least one input item


def sequences_from_artifact(artifact_dir: str | Path) -> tuple[dict[str, list], str]:
    path = Path(artifact_dir) / "user_histories.json"
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no user_histories.json (not an exported artifact directory)")
    try:
        histories = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    if not isinstance(histories, dict) or not histories:
        raise ArtifactError(f"{path}: expected a non-empty {{user_id: [item ids]}} object")
    return histories, f"artifact {Path(artifact_dir).resolve()}"


def sequences_from_data(data: str) -> tuple[dict[str, list], str]:
    from compressor.data import prepare

    rec = prepare(data)
    return ({str(u): [rec.vocab.item(int(t)) for t in seq] for u, seq in rec.sequences.items()},
            f"data {rec.name}")


def build_payloads(sequences: dict[str, list], source: str, n_users: int = 500, n_histories: int = 500,
                   seed: int = 0) -> dict:
    """Sample users (by id) and test-split histories (item ids, oldest first) reproducibly."""
    eligible = sorted((u for u, s in sequences.items() if len(s) >= MIN_SEQUENCE), key=str)
    if not eligible:
        raise CompressorError(f"{source}: no user has {MIN_SEQUENCE} or more interactions")
    rng = np.random.default_rng(seed)
    users = [eligible[i] for i in rng.permutation(len(eligible))[:n_users]]
    hist_users = [eligible[i] for i in rng.permutation(len(eligible))[:n_histories]]

    return {
        "format": FORMAT, "source": source, "seed": seed,
        "user_ids": [parse_id(u) for u in users],
        "histories": [list(sequences[u][:-1]) for u in hist_users],
    }


def save_payloads(payload: dict, path: str | Path) -> Path:
    """JSON with one history per line: compact, yet diffs and greps stay readable."""
    head = {k: v for k, v in payload.items() if k != "histories"}
    body = json.dumps(head)[:-1] + ', "histories": [\n'
    body += ",\n".join(json.dumps(h) for h in payload["histories"]) + "\n]}\n"
    return atomic_write(path, body)


def load_payloads(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"{path}: no payload file (make one with `python -m benchmarks.make_payloads`)")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressorError(f"{path}: not a payload file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompressorError(f"{path}: not a {FORMAT} file")
    if not payload["user_ids"] and not payload["histories"]:
        raise CompressorError(f"{path}: no requests in the payload file")
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_payloads", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="exported artifact directory (reads user_histories.json)")
    src.add_argument("--data", help="dataset name or path for compressor.data.prepare")
    p.add_argument("--users", type=int, default=500, help="known user ids to sample")
    p.add_argument("--histories", type=int, default=500, help="explicit histories to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        seqs, source = sequences_from_artifact(args.artifact) if args.artifact else sequences_from_data(args.data)
        payload = build_payloads(seqs, source, args.users, args.histories, args.seed)
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_payloads(payload, args.out)
    print(f"wrote {args.out}: {len(payload['user_ids'])} user ids, {len(payload['histories'])} histories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
