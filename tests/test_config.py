"""compressor.config: YAML in, overrides applied, every way a config can be wrong one line at load;
and configs/default.yaml equal, value for value, to the code's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from compressor.config import (
    BUNDLED_CONFIGS,
    apply_overrides,
    dump_config,
    load_config,
    read_yaml,
    resolve_config_path,
)
from compressor.errors import CompressorError
from compressor.pipeline import RunConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = 0.1
    names: list[str] = Field(default_factory=list)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(3, ge=1)
    inner: Inner = Inner()


def _differences(code, shown, where: str = "") -> list[str]:
    if isinstance(code, dict) and isinstance(shown, dict):
        return [d for k in code.keys() | shown.keys()
                for d in _differences(code.get(k, "<missing>"), shown.get(k, "<missing>"), f"{where}{k}.")]
    return [] if code == shown else [f"{where.rstrip('.')}: code {code!r}, yaml {shown!r}"]


def test_default_yaml_is_the_codes_defaults_value_for_value():
    """The pydantic fields are the one source of every default; configs/default.yaml shows them."""
    shown = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert _differences(RunConfig().model_dump(mode="json"), shown) == []
    assert load_config(RunConfig, CONFIGS / "default.yaml") == RunConfig()


def test_every_bundled_config_loads_and_the_bundle_is_the_repositorys_configs():
    assert BUNDLED_CONFIGS.resolve() == CONFIGS.resolve()
    for path in CONFIGS.glob("*.yaml"):
        load_config(RunConfig, path.stem)  # by bundled name, as `--config smoke` does
    assert resolve_config_path("smoke") == BUNDLED_CONFIGS / "smoke.yaml"
    with pytest.raises(CompressorError, match=r"no such config file \(bundled configs: default, llm"):
        resolve_config_path("nope")


def test_overrides_set_nested_fields_as_yaml_scalars():
    raw = apply_overrides({"inner": {"rate": 0.5}}, ["steps=7", "inner.names=[a, b]", "inner.rate=null"])
    assert raw == {"steps": 7, "inner": {"names": ["a", "b"], "rate": None}}
    cfg = load_config(Outer, None, ["inner.rate=2.5e-1", "inner.names=[x]"])
    assert cfg == Outer(inner=Inner(rate=0.25, names=["x"]))  # "2.5e-1" is a YAML string; pydantic reads it


@pytest.mark.parametrize(("overrides", "message"), [
    (["steps"], "not of the form key.sub=value"),
    (["steps.sub=1"], "steps is not a section"),
    (["inner.names=[a"], "value is not valid YAML"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(CompressorError, match=message):
        apply_overrides({"steps": 3}, overrides)


@pytest.mark.parametrize(("text", "message"), [
    (b"steps: [1, 2\n", r"not valid YAML at line 2, column 1: "),
    (b"steps: 2\n\xff\n", r"not UTF-8 text \(byte 9\)"),
    (b"- a\n- b\n", "a config must be a mapping of field: value, got list"),
    (b"steps: 2\ninner:\n  rate: 1\n  rate: 2\n", r"not valid YAML at line 4, column 3: key 'rate' given twice"),
    (b"stepz: 2\n", r"^config: stepz: Extra inputs are not permitted \(1 error\(s\)\)$"),
    (b"steps: 0\ninner:\n  rate: x\n", r"^config: steps: Input should be greater than or equal to 1 \(2 error\(s\)\)$"),
])
def test_a_bad_file_is_one_line_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(CompressorError, match=message) as e:
        load_config(Outer, path)
    assert "\n" not in str(e.value)


def test_empty_file_is_every_default_and_a_directory_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {} and load_config(Outer, tmp_path / "empty.yaml") == Outer()
    with pytest.raises(CompressorError, match="cannot read"):
        read_yaml(tmp_path)


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, "smoke", ["selection.keep=1", "distill.lam=0.1"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg


def test_a_selection_method_the_importance_stage_does_not_run_fails_at_load():
    with pytest.raises(CompressorError, match="selection.method 'ablation_greedy' is not among importance.methods"):
        load_config(RunConfig, "smoke", ["selection.method=ablation_greedy"])
    load_config(RunConfig, "smoke", ["selection.method=ablation_greedy", "selection.layers=[0, 3]"])  # no scores read
