"""The artifact directory: one layout for teacher and student, written by `export`, read by `serving`.

    model.onnx            (input_ids, attention_mask) int64 (B, T), LEFT-padded with 0 -> hidden float32 (B, H)
    model.int8.onnx       the same graph quantized (only when asked for)
    item_vocab.json       token <-> the dataset's item id (token 0 = [PAD], items from `num_special`)
    item_embeddings.npy   float32 (V, H), row = token id (row 0 = pad, never recommended)
    item_bias.npy         float32 (V,), only when the output head has a bias
    items.json            [{"item_id", "title", "genres"}] for every catalogue item, in token order
    user_histories.json   {str(user_id): [item ids, oldest first]} for the users of the data
    README.md             model card: YAML front matter (licence, data, metrics, protocol, use)
    manifest.json         every other file with bytes + sha256, and the model's description

The score of item token i for a history is `hidden @ item_embeddings[i] (+ item_bias[i])`; it
is kept out of the graph so Faiss can retrieve over catalogues of millions of items.

This module needs only the standard library, so the serving Bento can use it without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compressor.atomic import atomic_directory, atomic_write, atomic_write_json  # noqa: F401 (re-exported)
from compressor.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_ONNX = "model.onnx"
QUANTIZED_ONNX = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
VOCAB = "item_vocab.json"
EMBEDDINGS = "item_embeddings.npy"
BIAS = "item_bias.npy"
ITEMS = "items.json"
USER_HISTORIES = "user_histories.json"
CARD_FILE = "README.md"  # the model card (its text: compressor.model_card), in artifacts and model directories
REQUIRED = (MODEL_ONNX, VOCAB, EMBEDDINGS, ITEMS, USER_HISTORIES)
# Manifest fields serving and the report rely on; a manifest without them is not ours.
REQUIRED_FIELDS = ("format_version", "kind", "architecture", "num_layers", "hidden_size", "max_len",
                   "vocab_size", "files", "serve_model", "parity")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(directory: Path) -> dict:
    """{name: {"bytes", "sha256"}} for every regular file in `directory` except the manifest."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_json(path: Path, payload) -> None:
    """The artifact's JSON files: indent 1 keeps the large ones (items, user histories) small."""
    atomic_write_json(path, payload, indent=1)


def write_manifest(directory: Path, fields: dict, card: str | None = None) -> dict:
    """Write the model card (`card`, Markdown, as README.md), describe every file now in
    `directory` and write `manifest.json` (last). The card is made by the caller
    (`compressor.model_card`): serving imports this module, and the Bento ships only what it needs."""
    if card is not None:
        atomic_write(directory / CARD_FILE, card)
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": describe_files(directory)}
    missing = [n for n in REQUIRED if n not in manifest["files"]]
    if missing:
        raise ArtifactError(f"{directory}: cannot write a manifest, missing {missing}")
    if manifest.get("serve_model") not in manifest["files"]:
        raise ArtifactError(f"{directory}: serve_model {manifest.get('serve_model')!r} is not a file of the artifact")
    write_json(directory / MANIFEST, manifest)
    return manifest


def load_manifest(directory: str | Path) -> dict:
    """Read and sanity-check `manifest.json` (not the files; see `verify_artifact`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    path = directory / MANIFEST
    if not path.exists():
        raise ArtifactError(
            f"{directory}: no {MANIFEST}; the directory is half-written or not an artifact "
            "(export it again with `compressor export`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: corrupt manifest (not a JSON object)")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {manifest['format_version']}, this code reads format {FORMAT_VERSION}"
        )
    return manifest


def verify_artifact(directory: str | Path, check_hashes: bool = True) -> dict:
    """Check every file the manifest names exists with its recorded size (and sha256).

    Returns the manifest; raises ArtifactError naming each bad file otherwise."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems = []
    for name, meta in manifest["files"].items():
        p = directory / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, manifest says {meta['bytes']}")
        elif check_hashes and sha256_file(p) != meta["sha256"]:
            problems.append(f"{name} does not match its sha256 (modified or corrupt)")
    if problems:
        raise ArtifactError(f"{directory}: corrupt artifact: " + "; ".join(problems))
    return manifest


def is_artifact(directory: str | Path) -> bool:
    try:
        verify_artifact(directory, check_hashes=False)
        return True
    except ArtifactError:
        return False


