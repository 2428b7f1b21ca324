"""YAML configs: pydantic models with `extra="forbid"`, plus `a.b=value` command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from compressor.errors import CompressorError

M = TypeVar("M", bound=BaseModel)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set nested keys from `section.key=value` strings; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise CompressorError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CompressorError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Read `path` (YAML) into `model`, applying overrides; unknown keys and bad types are errors."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CompressorError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise CompressorError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise CompressorError(f"{p}: a config must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CompressorError(f"config: {where}: {first['msg']} ({e.error_count()} error(s))") from e


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
