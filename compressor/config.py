"""YAML configs: pydantic models with `extra="forbid"`, plus `a.b=value` command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from compressor.atomic import atomic_write
from compressor.errors import CompressorError

M = TypeVar("M", bound=BaseModel)

# Configs shipped inside the package (`compressor/configs` is a link to the repository's
# `configs/`, so the wheel carries the same files): `--config default` works after any install.
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself when it exists, else the bundled config of that name (`default`, `smoke`)."""
    p = Path(path)
    if p.exists():
        return p
    if p.suffix in ("", ".yaml") and p.parent == Path(".") and (BUNDLED_CONFIGS / f"{p.stem}.yaml").is_file():
        return BUNDLED_CONFIGS / f"{p.stem}.yaml"
    raise CompressorError(f"{p}: no such config file (bundled configs: {', '.join(bundled_configs())})")


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one
    silently, so a config edited twice would run with whichever value came second."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; every way it can be unreadable is one CompressorError line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CompressorError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from e
    except OSError as e:  # a directory, no permission, ...
        raise CompressorError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from e
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        # PyYAML's message spans several lines (context, caret diagram); keep problem + position.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise CompressorError(f"{p}: not valid YAML{where}: {_one_line(problem)}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CompressorError(f"{p}: a config must be a mapping of field: value, got {type(raw).__name__}")
    return raw


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
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CompressorError(f"override {item!r}: value is not valid YAML") from e
    return raw


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Read `path` (YAML, or a bundled config's name) into `model`, applying overrides; unknown
    keys, bad types and values a stage would reject later are errors now."""
    raw: dict = read_yaml(resolve_config_path(path)) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = _one_line(first["msg"]).removeprefix("Value error, ")
        raise CompressorError(f"config: {where + ': ' if where else ''}{msg} ({e.error_count()} error(s))") from e


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
