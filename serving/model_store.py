"""Versioned artifacts in the BentoML Model Store (`$BENTOML_HOME/models`).

    python -m serving.model_store runs/default/student recsys-student   # prints the new tag
    RECSYS_MODEL_TAG=recsys-student:latest bentoml serve serving.service:Recommender

`save_to_store` copies an artifact directory byte for byte into a new store version (its
manifest's facts become the model's metadata and labels), so the manifest's sha256 checks still
hold there. The service serves `RECSYS_MODEL_TAG` when it is set (`resolve_artifact_dir`), else
`RECSYS_ARTIFACT_DIR`. Only this module and serving/service.py touch the store;
serving/recommender.py still never imports bentoml.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import bentoml
import yaml

from compressor.artifact import load_manifest
from compressor.errors import ArtifactError

# Manifest facts kept as store metadata (scalars: `bentoml models get` shows them).
METADATA_KEYS = ("kind", "architecture", "num_layers", "teacher_layers", "hidden_size", "max_len",
                 "parameters", "serve_model", "created_at")


def save_to_store(artifact_dir: str | Path, name: str) -> str:
    """Copy `artifact_dir` into a new version of model `name`; return its tag (`name:version`).
    ArtifactError when the directory has no readable manifest."""
    src = Path(artifact_dir)
    manifest = load_manifest(src)
    metadata = {k: manifest[k] for k in METADATA_KEYS if manifest.get(k) is not None}
    data = manifest.get("data") or {}
    metadata.update({f"data_{k}": str(data[k]) for k in ("name", "fingerprint") if k in data})
    metadata["source_dir"] = str(src.resolve())
    with bentoml.models.create(name, metadata=metadata,
                               labels={"kind": str(manifest.get("kind", "unknown"))}) as model:
        shutil.copytree(src, model.path, dirs_exist_ok=True)
    return str(model.tag)


def built_bento_model(cwd: Path | None = None) -> str | None:
    """The model a built Bento carries, when this process serves one: `bentoml serve TAG` imports
    the service with the Bento's `src/` as the working directory, beside its `bento.yaml`, whose
    `models` list the tags (concrete versions) the build packed. None outside a Bento, or when
    the Bento carries no model or several (then RECSYS_MODEL_TAG must say which)."""
    cwd = cwd or Path.cwd()
    info = cwd.parent / "bento.yaml"
    if cwd.name != "src" or not info.is_file():
        return None
    try:
        models = (yaml.safe_load(info.read_text()) or {}).get("models") or []
    except (OSError, yaml.YAMLError):
        return None
    tags = [m.get("tag") if isinstance(m, dict) else m for m in models]
    return str(tags[0]) if len(tags) == 1 and tags[0] else None


def resolve_artifact_dir(model_tag: str | None, artifact_dir: Path) -> Path:
    """The directory to serve: the store's copy of `model_tag` when set, else `artifact_dir`.
    ArtifactError (one line) when the tag is not in the store."""
    if not model_tag:
        return artifact_dir
    try:
        return Path(bentoml.models.get(model_tag).path)
    except bentoml.exceptions.NotFound as e:
        raise ArtifactError(f"RECSYS_MODEL_TAG={model_tag!r}: not in the BentoML Model Store "
                            f"({(str(e).splitlines() or [''])[0][:200]})") from None
    except ValueError as e:  # a malformed tag
        raise ArtifactError(f"RECSYS_MODEL_TAG={model_tag!r}: {e}") from None


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m serving.model_store ARTIFACT_DIR NAME", file=sys.stderr)
        raise SystemExit(2)
    try:
        print(save_to_store(sys.argv[1], sys.argv[2]))
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
