"""The artifact directory contract: verification of corrupt or half-written directories, atomic
replacement, and the serving loader's consistency checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from compressor.artifact import (
    atomic_directory,
    is_artifact,
    load_manifest,
    verify_artifact,
    write_manifest,
)
from compressor.errors import ArtifactError
from serving.artifact import load_artifact


@pytest.fixture
def art(tiny_artifact_dir, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact_dir, out)
    return out


def test_intact_artifact_verifies(art):
    m = verify_artifact(art)
    assert is_artifact(art) and m == load_manifest(art)


def test_flipped_byte_is_detected(art):
    path = art / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        verify_artifact(art)
    verify_artifact(art, check_hashes=False)  # same size: only the hash can tell


def test_truncated_and_missing_files_are_detected(art):
    path = art / "item_embeddings.npy"
    path.write_bytes(path.read_bytes()[:100])
    (art / "items.json").unlink()
    with pytest.raises(ArtifactError, match=r"item_embeddings.npy has 100 bytes.*items.json is missing"):
        verify_artifact(art, check_hashes=False)
    assert not is_artifact(art)


def test_half_written_directory_is_named(art):
    (art / "manifest.json").unlink()  # the manifest is written last
    with pytest.raises(ArtifactError, match="half-written"):
        load_artifact(art)
    (art / "manifest.json").write_text('{"format_version": 1, "kind": "stu')
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        verify_artifact(art)
    (art / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ArtifactError, match="manifest lacks"):
        verify_artifact(art)


def test_atomic_directory_keeps_old_on_error_and_replaces_on_success(art, tmp_path):
    before = (art / "manifest.json").read_text()
    with pytest.raises(RuntimeError), atomic_directory(art) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("killed mid-export")
    assert (art / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "new" / "x.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "new"]


def test_manifest_must_name_the_required_files(tmp_path):
    (tmp_path / "model.onnx").write_text("x")
    with pytest.raises(ArtifactError, match="missing"):
        write_manifest(tmp_path, {"serve_model": "model.onnx"})


def test_serving_loader_reads_and_checks_consistency(art):
    a = load_artifact(art)
    m = a.manifest
    assert a.embeddings.shape == (m["vocab_size"], m["hidden_size"]) and a.bias is None
    assert a.onnx_path.name == "model.onnx" and a.max_len == 20
    tok = a.token(1)
    assert tok is not None and tok >= a.num_special and a.token("1") == tok and a.token(10**9) is None
    assert a.item_info(tok)["title"] == "Toy Story (1995)"
    assert a.user_history(next(iter(a.histories))) and a.user_history("no such user") is None
    with pytest.raises(ArtifactError, match="no ONNX file"):
        load_artifact(art, model_file="model.int8.onnx")
    # A consistent manifest over inconsistent contents: the loader still refuses.
    items = json.loads((art / "items.json").read_text())
    (art / "items.json").write_text(json.dumps(items[::-1]))
    np.save(art / "item_embeddings.npy", np.zeros((3, 4), dtype=np.float32))
    fields = {k: v for k, v in m.items() if k not in ("files", "format_version")}
    write_manifest(art, fields)
    with pytest.raises(ArtifactError, match=r"inconsistent artifact: item_embeddings \(3, 4\).*token order"):
        load_artifact(art)
