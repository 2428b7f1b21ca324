"""References generated from the code: the run config (pydantic), the CLI (argparse) and the
HTTP API (the BentoML service's OpenAPI document)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
import typing
from functools import cache

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from benchmarks.docs.core import ROOT, Ctx, DocsError, table

OPENAPI_JSON = "docs/reference/openapi.json"


def _esc(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _fields(model: type[BaseModel], prefix: str = "") -> list[list[str]]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            rows += _fields(sub, f"{prefix}{name}.")
            continue
        models = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:  # an optional section (`X | None`): the section's own row, then its fields
            rows.append([f"`{prefix}{name}`", _type_name(ann), _default(field), _esc(field.description or "")])
            rows += _fields(models[0], f"{prefix}{name}.")
            continue
        rows.append([f"`{prefix}{name}`", _type_name(ann), _default(field), _esc(field.description or "")])
    return rows


def config_reference(ctx: Ctx) -> str:
    """Every field of `RunConfig`, one table per section, from the pydantic models themselves."""
    from compressor.pipeline.config import RunConfig

    out = []
    for name, field in RunConfig.model_fields.items():
        model = field.annotation
        doc = (field.description or (model.__doc__ or "").strip().split("\n\n")[0]).replace("\n", " ")
        out += [f"### `{name}`", "", f"{model.__name__}: {doc}" if doc else model.__name__, "",
                table(["field", "type", "default", "description"], _fields(model, f"{name}.")), ""]
    out.append(f"<small>Rendered by `python -m benchmarks.docs` from {ctx.link('`compressor/pipeline/config.py`', 'compressor/pipeline/config.py')} "
               "(`RunConfig` and the models it composes).</small>")
    return "\n".join(out)


def _action_row(a: argparse.Action) -> list[str]:
    name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}`"
    if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._VersionAction):
        name += f" `{a.metavar or a.dest.upper()}`"
    if a.nargs in ("*", "+") and not a.option_strings:
        name += " …"
    default = a.default
    if a.required and a.nargs not in ("*", "?"):
        shown = "required"
    elif default in (None, False, [], 0) or default is argparse.SUPPRESS:
        shown = ""
    else:
        shown = f"`{default}`"
    choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices and not isinstance(a.choices, dict) else ""
    return [name, shown, _esc((a.help or "") % {"default": default, "prog": ""} if a.help else "") + choices]


def cli_reference(ctx: Ctx) -> str:
    """Every command of `compressor` with its arguments, from the argparse parser it runs."""
    from compressor.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)
                   and a.dest not in ("verbose", "quiet")]
        out += [f"### `compressor {name}`", "", (helps.get(name) or "").rstrip(".") + ".", "",
                table(["argument", "default", "meaning"], [_action_row(a) for a in actions]), ""]
    out += ["Every command also takes `-v`/`--verbose` (debug messages) and `-q`/`--quiet` (warnings and "
            "errors only, no progress bars); `compressor --version` prints the version.", "",
            f"<small>Rendered by `python -m benchmarks.docs` from {ctx.link('`compressor/cli.py`', 'compressor/cli.py')} "
            "(`build_parser`).</small>"]
    return "\n".join(out)


def settings_reference(ctx: Ctx) -> str:
    """Every `RECSYS_*` serving setting, from the pydantic-settings model the service reads."""
    from serving.settings import PREFIX, ServingSettings

    rows = []
    for name, field in ServingSettings.model_fields.items():
        env = f"`{PREFIX}{name.upper()}`"
        rows.append([env, _type_name(field.annotation), _default(field), _esc(field.description or "")])
    return "\n".join([table(["variable", "type", "default", "meaning"], rows), "",
                      f"<small>Rendered by `python -m benchmarks.docs` from "
                      f"{ctx.link('`serving/settings.py`', 'serving/settings.py')} (`ServingSettings`).</small>"])


def data_columns(ctx: Ctx) -> str:
    """The column names a generic interactions/items table may use, from the loader itself."""
    from compressor.data import loaders

    rows = [[f"`{to}`", ", ".join(f"`{c}`" for c in getattr(loaders, name))]
            for to, name in (("user", "_USER_COLS"), ("item", "_ITEM_COLS"), ("timestamp", "_TIME_COLS"))]
    return "\n".join([table(["column", "accepted names (the first one present is used)"], rows), "",
                      f"<small>Rendered by `python -m benchmarks.docs` from "
                      f"{ctx.link('`compressor/data/loaders.py`', 'compressor/data/loaders.py')}.</small>"])


def model_card_example(ctx: Ctx, folder: str) -> str:
    """The card `compressor/model_card.py` writes for a job's student, with that job's test metrics."""
    from benchmarks.docs.core import RESULTS, load_json
    from compressor.model_card import build_card

    path = f"{RESULTS}/{folder}/report.json"
    r = load_json(path)
    s = r["student"]
    import pandas as pd

    if r["data"]["name"] != "ml-latest-small":
        raise DocsError(f"{path}: the example card needs the bundled data's catalogue")
    items = pd.read_csv(ROOT / "compressor/datasets/ml-latest-small/ratings.csv")["movieId"].nunique()
    text = build_card("student", s["architecture"], s["parameters"], s["num_layers"], s["hidden_size"],
                      items, r["data"]["name"],
                      r["evaluation"]["metrics"]["student"], "test", teacher_layers=s.get("teacher_layers"),
                      data_fingerprint=r["data"]["fingerprint"], library="onnx")
    front = text.split("\n---\n", 1)[0] + "\n---"
    return "\n".join(["```yaml", front, "```", "",
                      f"<small>Rendered by `python -m benchmarks.docs`: "
                      f"{ctx.link('`compressor/model_card.py`', 'compressor/model_card.py')} `build_card` on the "
                      f"student of {ctx.link(f'`{path}`', path)} (the item count from the bundled ratings: the "
                      "report does not record it; an artifact's card takes it from its manifest).</small>"])


EXTRA_USES = {  # what each extra is for (the packages come from pyproject.toml)
    "cpu": "export, speed measurement, serving, batch scoring (CPU builds)",
    "gpu": "the same on CUDA: install instead of `cpu`, never both (they install the same modules)",
    "serve": "the HTTP service",
    "bench": "load tests",
    "llm": "pretrained LLM teachers from GGUF files",
    "parquet": "Parquet input, `compressor recommend` output",
    "ray": "batch scoring on a Ray cluster (`compressor recommend --engine ray`)",
    "docs": "the documentation site",
    "dev": "development: what the quick start installs",
}


def extras(ctx: Ctx) -> str:
    """The package's extras and what they install, from pyproject.toml."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rows = []
    for name, reqs in project["optional-dependencies"].items():
        names = []
        for r in reqs:
            m = re.match(r"recsys-compressor\[([^\]]+)\]", r)
            names += [f"the `{x}` extra" for x in m[1].split(",")] if m else [re.split(r"[<>=!~;\[ ]", r)[0]]
        if name == "dev":
            inner = [n for n in names if n.startswith("the `")]
            names = [f"every extra but `gpu` ({len(inner)})"] + [n for n in names if not n.startswith("the `")]
        rows.append([f"`{name}`", ", ".join(names), EXTRA_USES.get(name, "—")])
    return "\n".join([table(["extra", "installs", "for"], rows), "",
                      f"<small>Rendered by `python -m benchmarks.docs` from "
                      f"{ctx.link('`pyproject.toml`', 'pyproject.toml')}.</small>"])


# ----------------------------------------------------------------------------- HTTP API
_SPEC_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from serving.service import Recommender
print(json.dumps(Recommender.openapi_spec.asdict(), sort_keys=True))
"""


@cache
def openapi() -> dict:
    """The service's OpenAPI document, from the BentoML class without serving: imported in a
    child process with default settings (no RECSYS_* from this shell) and no artifact check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    with tempfile.TemporaryDirectory() as home:
        env.update(RECSYS_PREFLIGHT="0", BENTOML_HOME=home, BENTOML_DO_NOT_TRACK="True")
        r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT, str(ROOT)], capture_output=True, text=True,
                           env=env, cwd=home, timeout=300)
    if r.returncode != 0:
        raise DocsError(f"could not read the service's OpenAPI document: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def _schema_type(s: dict) -> str:
    if "$ref" in s:
        return s["$ref"].rsplit("/", 1)[1]
    if "anyOf" in s:
        return " or ".join(_schema_type(x) for x in s["anyOf"])
    t = s.get("type", "object")
    if t == "array":
        return f"array of {_schema_type(s.get('items', {}))}"
    return t


def _limits(s: dict) -> str:
    parts = [f"{k} {s[k]}" for k in ("minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength")
             if k in s and abs(s[k]) < 1e15]
    return ", ".join(parts)


def http_reference(ctx: Ctx) -> str:
    """Each endpoint: its purpose, request fields and responses, from the OpenAPI document."""
    spec = openapi()
    out = []
    first = ["/recommend", "/rank", "/item", "/embed"]  # the service's own API, then BentoML's
    paths = sorted(spec["paths"], key=lambda p: (first.index(p) if p in first else len(first), p))
    for path in paths:
        ops = spec["paths"][path]
        for method, op in ops.items():
            out += [f"### `{method.upper()} {path}`", "", _esc(op.get("description") or op.get("summary") or ""), ""]
            body = ((op.get("requestBody") or {}).get("content") or {}).get("application/json", {}).get("schema")
            if body and body.get("properties"):
                req = set(body.get("required") or [])
                rows = [[f"`{n}`", _schema_type(s), "required" if n in req else f"`{json.dumps(s.get('default'))}`",
                         _limits(s), _esc(s.get("description", ""))] for n, s in body["properties"].items()]
                one_of = body.get("oneOf")
                out += [table(["field", "type", "default", "limits", "description"], rows), ""]
                if one_of:
                    out += ["Exactly one of " + " and ".join(f"`{o['required'][0]}`" for o in one_of) + ".", ""]
            codes = ", ".join(f"{c} ({r.get('description', '')})" for c, r in op.get("responses", {}).items())
            if codes:
                out += [f"Responses: {codes}.", ""]
    out.append(f"<small>Rendered by `python -m benchmarks.docs` from the OpenAPI document of "
               f"{ctx.link('`serving/service.py`', 'serving/service.py')} with default settings "
               f"(the server publishes the same at `/docs.json`; a copy: {ctx.link('`openapi.json`', OPENAPI_JSON)}).</small>")
    return "\n".join(out)


def openapi_file() -> str:
    return json.dumps(openapi(), indent=2, sort_keys=True) + "\n"


RENDERERS = {
    "config-reference": config_reference,
    "cli-reference": cli_reference,
    "http-reference": http_reference,
    "settings-reference": settings_reference,
    "data-columns": data_columns,
    "model-card": model_card_example,
    "extras": extras,
}
