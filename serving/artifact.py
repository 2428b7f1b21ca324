"""Load an artifact directory (layout in `compressor.artifact`) for serving: no torch, no pandas."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor import artifact as art
from compressor.errors import ArtifactError
from compressor.ids import lookup


@dataclass
class ServingArtifact:
    """Everything serving reads from an artifact directory, checked for consistency."""

    path: Path
    manifest: dict
    onnx_path: Path
    items: list  # item id of token num_special + i
    num_special: int
    embeddings: np.ndarray  # (V, H) float32, row = token
    bias: np.ndarray | None  # (V,) or None
    metadata: list[dict]  # {"item_id", "title", "genres"} per item, token order
    histories: dict[str, list]  # str(user_id) -> item ids, oldest first
    _token: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._token = {item: i + self.num_special for i, item in enumerate(self.items)}

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    def token(self, item) -> int | None:
        """Token of a dataset item id under any of its spellings (`compressor.ids`); None when it
        is not exactly a catalogue id."""
        return lookup(self._token, item)

    def item_info(self, token: int) -> dict:
        return self.metadata[int(token) - self.num_special]

    def user_history(self, user_id) -> list | None:
        if isinstance(user_id, bool) or not isinstance(user_id, int | str):
            return None
        return self.histories.get(str(user_id))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)  # data only: a pickled object array is refused
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: unreadable array ({str(e)[:200]})") from e


def load_artifact(directory: str | Path, model_file: str | None = None, verify: bool = True) -> ServingArtifact:
    """Read an artifact directory; `model_file` overrides the manifest's `serve_model`
    (e.g. "model.int8.onnx"). `verify` checks every file's size and sha256 first. Every problem
    is an ArtifactError with a one-line message (the service's start-up error)."""
    directory = Path(directory)
    try:
        return _load(directory, model_file, verify)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a manifest of the wrong shape
        raise ArtifactError(f"{directory}: malformed artifact ({type(e).__name__}: {str(e)[:200]})") from e


def _load(directory: Path, model_file: str | None, verify: bool) -> ServingArtifact:
    manifest = art.verify_artifact(directory) if verify else art.load_manifest(directory)
    # Files are named relative to the directory; a name with a path part could point outside it.
    outside = [n for n in manifest["files"] if Path(n).name != n or n in (".", "..")]
    if outside:
        raise ArtifactError(f"{directory}: manifest names files outside the directory: {outside[:3]}")
    model_file = model_file or manifest["serve_model"]
    if model_file not in manifest["files"]:
        raise ArtifactError(f"{directory}: no ONNX file {model_file!r} (have {sorted(manifest['onnx_files'])})")
    vocab = _read_json(directory / art.VOCAB)
    items, num_special = list(vocab["items"]), len(vocab["special_tokens"])
    embeddings = _load_npy(directory / art.EMBEDDINGS).astype(np.float32, copy=False)
    bias = _load_npy(directory / art.BIAS).astype(np.float32) if (directory / art.BIAS).exists() else None
    metadata = _read_json(directory / art.ITEMS)
    histories = _read_json(directory / art.USER_HISTORIES)
    vocab_size = num_special + len(items)
    problems = []
    if vocab_size != manifest["vocab_size"]:
        problems.append(f"vocabulary has {vocab_size} tokens, manifest says {manifest['vocab_size']}")
    if embeddings.ndim != 2 or embeddings.shape != (vocab_size, manifest["hidden_size"]):
        problems.append(f"item_embeddings {embeddings.shape} != ({vocab_size}, {manifest['hidden_size']})")
    elif not np.isfinite(embeddings).all():
        problems.append("item_embeddings has non-finite values")
    if bias is not None and bias.shape != (vocab_size,):
        problems.append(f"item_bias {bias.shape} != ({vocab_size},)")
    if [m.get("item_id") for m in metadata] != items:
        problems.append("items.json does not list the vocabulary's items in token order")
    if not isinstance(histories, dict):
        problems.append("user_histories.json is not an object")
    if problems:
        raise ArtifactError(f"{directory}: inconsistent artifact: " + "; ".join(problems))
    return ServingArtifact(directory, manifest, directory / model_file, items, num_special,
                           np.ascontiguousarray(embeddings), bias, metadata, histories)
