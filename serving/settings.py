"""Every setting of the recommendation service, read once from `RECSYS_*` environment variables.

One pydantic-settings model, so each value is parsed and checked the same way and a bad one is a
one-line start-up error (`RECSYS_THREADS='four': Input should be a valid integer`), never a
traceback at import. serving/README.md's settings table is tested against this model
(tests/test_serving.py), so names and defaults there cannot drift from the code.

    from serving.settings import get_settings
    s = get_settings()        # cached; raises SettingsError (one line) for a bad value
"""

from __future__ import annotations

import functools
import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "RECSYS_"


class SettingsError(ValueError):
    """A bad `RECSYS_*` value; the message is one line naming the variable."""


class ServingSettings(BaseSettings):
    """Serving settings; the environment variable of a field is `RECSYS_` + its upper-case name."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True,
                                      validate_default=True)

    # -- artifact ---------------------------------------------------------------------------------
    artifact_dir: Path = Field(Path("runs/default/student"), description="artifact directory to serve")
    model_tag: str | None = Field(None, description="BentoML Model Store tag to serve instead of "
                                                    "`RECSYS_ARTIFACT_DIR` (`name:version` or "
                                                    "`name:latest`; `python -m serving.model_store`)")
    model_file: str | None = Field(None, description="ONNX file to serve, e.g. `model.int8.onnx` "
                                                     "(default: the manifest's `serve_model`)")
    verify_artifact: bool = Field(True, description="check every file's size and sha256 against "
                                                    "manifest.json at start-up")
    preflight: bool = Field(True, description="`bentoml serve` opens the artifact itself before "
                                              "starting workers: a bad one exits 2 with one line")
    # -- model and retrieval ----------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime provider")
    ort_intra_threads: int = Field(
        1, ge=1, le=256, validation_alias=AliasChoices("RECSYS_ORT_INTRA_THREADS", "RECSYS_ORT_THREADS"),
        description="ONNX Runtime intra-op threads per session (alias `RECSYS_ORT_THREADS`)")
    ort_inter_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime inter-op threads")
    hnsw_threshold: int = Field(100_000, ge=0, description="catalogue size from which HNSW replaces "
                                                           "the exact flat index")
    hnsw_m: int = Field(32, ge=2, le=512, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(40, ge=1, description="HNSW build breadth")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth")
    hnsw_storage: Literal["float", "fp16", "sq8"] = Field(
        "float", description="how the HNSW index stores item vectors: 4, 2 or 1 bytes a dimension "
        "(candidates are re-scored with the float embeddings either way)")
    faiss_threads: int = Field(1, ge=1, le=256, description="Faiss search threads per worker")
    faiss_gpu: Literal["auto", "never"] = Field("auto", description="`never` keeps the flat index "
                                                                     "on the CPU")
    index_cache_dir: Path | None = Field(None, description="keep built HNSW graphs here (checksummed, "
                                                           "keyed by embeddings + parameters)")
    # -- server -----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", min_length=1, description="bind address of `bentoml serve` "
                                                            "(`--host` overrides; `0.0.0.0` in a container)")
    threads: int = Field(4, ge=1, le=256, description="API threads per worker")
    workers: int = Field(1, ge=1, le=64, description="worker processes")
    access_log: bool = Field(False, description="one log line per request (costs about a student "
                                                "model call; `/metrics` keeps latency)")
    batching: bool = Field(False, description="route the model call through the adaptively batched "
                                              "`/embed` (also makes `/embed` batchable)")
    batch_max_size: int = Field(32, ge=1, description="adaptive batching: most rows per batch "
                                                      "(raised to `max_embed_rows` if below it)")
    batch_max_latency_ms: int = Field(20, ge=1, description="adaptive batching: latency budget")
    # -- limits (issue #12): a request the service accepts must succeed ---------------------------
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body; 413 beyond, "
                                                                 "checked before parsing")
    max_k: int = Field(100, ge=1, description="largest `k` of /recommend")
    max_candidates: int = Field(1000, ge=1, description="most `candidates` of /rank")
    max_history: int = Field(10_000, ge=1, description="most items in a `history` (a request size "
                                                       "cap, not the model's max_len)")
    max_embed_rows: int = Field(64, ge=1, description="most `histories` rows in one /embed request")
    max_concurrency: int = Field(8, ge=0, description="requests in flight per service (split over "
                                                       "workers); beyond it 503 + `Retry-After`; 0 = "
                                                       "no limit")
    retry_after_s: int = Field(1, ge=0, le=3600, description="`Retry-After` of a shed request")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request running longer "
                                                                      "is answered 504")

    @field_validator("host")
    @classmethod
    def _ip_address(cls, v: str) -> str:
        ipaddress.ip_address(v)  # BentoML's config accepts only an IP address (ValueError otherwise)
        return v

    @field_validator("model_file")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (Path(v).name != v or v.startswith(".")):
            raise ValueError("must be a file name inside the artifact")
        return v

    @property
    def embed_batch_size(self) -> int:
        """Batching never refuses one accepted /embed request: a batch holds at least one."""
        return max(self.batch_max_size, self.max_embed_rows)

    @property
    def concurrency_per_worker(self) -> int:
        """BentoML's own rule for traffic.max_concurrency: ceil(per service / workers)."""
        return -(-self.max_concurrency // self.workers) if self.max_concurrency else 0


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _clip(value: object, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "...'"


def _variable(loc: str) -> str:
    """The variable a setting was read from: `loc` is a field name or (aliased fields) the first
    alias; name the alias that is actually set."""
    for name, info in ServingSettings.model_fields.items():
        choices = [c for c in getattr(info.validation_alias, "choices", []) if isinstance(c, str)]
        if loc == name or loc in choices:
            return next((c for c in choices if c in os.environ), env_name(name))
    return loc if loc.startswith(PREFIX) else env_name(loc)


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = err.get("loc") or ()
        name = _variable(str(loc[0])) if loc else "RECSYS_* settings"
        shown = f"={_clip(err['input'])}" if loc and "input" in err else ""
        parts.append(f"{name}{shown}: {err['msg']}")
    return "bad serving setting: " + "; ".join(parts)


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """`RECSYS_*` variables that name no setting (probably typos; Locust's own are listed too)."""
    environ = os.environ if environ is None else environ
    known = {env_name(f) for f in ServingSettings.model_fields} | {"RECSYS_ORT_THREADS"}
    # The load generator's variables (benchmarks/locustfile.py) share the prefix.
    known |= {"RECSYS_PAYLOADS", "RECSYS_K", "RECSYS_USER_WEIGHT", "RECSYS_HISTORY_WEIGHT",
              "RECSYS_EXCLUDE_SEEN", "RECSYS_WAIT_S", "RECSYS_LATENCY_FILE", "RECSYS_SEED",
              "RECSYS_HONOR_RETRY_AFTER"}
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known)


def load_settings(**overrides) -> ServingSettings:
    """Settings from the environment (plus `overrides`, for tests); SettingsError when invalid."""
    try:
        # An empty variable means "unset" (e.g. RECSYS_MODEL_FILE= in a shell script).
        return ServingSettings(_env_parse_none_str="", **overrides)
    except ValidationError as e:
        raise SettingsError(_one_line(e)) from None


@functools.cache
def get_settings() -> ServingSettings:
    """The process's settings, read once."""
    return load_settings()


def _default(info) -> str:
    d = info.default
    if d is None:
        return "unset"
    if isinstance(d, bool):
        return "1" if d else "0"
    return f"{d:_}".replace("_", "") if isinstance(d, int) else str(d)


def markdown_table() -> str:
    """serving/README.md's settings table (`python -m serving.settings` prints it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in ServingSettings.model_fields.items():
        rows.append(f"| `{env_name(name)}` | `{_default(info)}` | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
