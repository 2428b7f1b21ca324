"""BentoML service: recommendations from one artifact directory (teacher or student, same code).

    RECSYS_ARTIFACT_DIR=runs/default/student bentoml serve serving.service:Recommender --port 3000

Endpoints (flat JSON bodies, Content-Type application/json; the schemas in `serving/schemas.py`
are the OpenAPI docs at /docs):
  POST /recommend  {"user_id": 1} or {"history": [1, 50, 260], "k": 10, "exclude_seen": true}
  POST /rank       {"user_id": 1, "candidates": [318, 296, 2571]}
  POST /item       {"item_id": 1}
  POST /embed      {"histories": [[1, 50, 260]]}  query vectors (at most RECSYS_MAX_EMBED_ROWS rows)
  GET  /healthz /livez /readyz /metrics (BentoML; request latency in
       bentoml_service_request_duration_seconds; ours: recsys_model_seconds,
       recsys_retrieval_seconds, recsys_unknown_items_total, recsys_truncated_histories_total,
       labelled model_kind = the manifest's kind, teacher or student)
Errors: {"error": "..."} with 400 bad input, 404 unknown user or item, 413 body too large,
415 not JSON, 503 + Retry-After overloaded or still loading, 504 timeout (serving/guard.py).
Settings: serving/settings.py (RECSYS_* environment; table in serving/README.md).
RECSYS_MODEL_TAG=name:version serves a BentoML Model Store version instead of RECSYS_ARTIFACT_DIR
(serving/model_store.py); the service then references it as a `bentoml.models.BentoModel`, and a
Bento built with it (bentofile.yaml `models:`) carries the model and serves it from its own store.

Start-up: a bad setting is one line on stderr and exit code 2 when `bentoml serve` imports this
module; a bad artifact is one line and exit code 2 from the deployment hook (`@on_deployment`,
run once by `bentoml serve` before any worker starts: a worker that fails in BentoML 1.4 is
restarted forever and the server never answers). Each worker then loads the engine in a
background thread, so /readyz answers 503 (not a hang) until it is warm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from compressor.errors import CompressorError
from serving.model_store import built_bento_model, resolve_artifact_dir
from serving.settings import ServingSettings, SettingsError, get_settings, unknown_variables


def _settings_or_exit() -> ServingSettings:
    try:
        return get_settings()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# Before the imports below: serving.schemas reads its limits from the settings at import.
S = _settings_or_exit()


def _served_dir(s: ServingSettings) -> ServingSettings:
    """RECSYS_MODEL_TAG, when set, replaces RECSYS_ARTIFACT_DIR by the store's copy; inside a built
    Bento with neither set, the model the Bento was built with is served. An unknown tag is one
    line and exit code 2, like a bad setting."""
    if not s.model_tag and "artifact_dir" not in s.model_fields_set:
        s = s.model_copy(update={"model_tag": built_bento_model()})
    if not s.model_tag:
        return s
    try:
        return s.model_copy(update={"artifact_dir": resolve_artifact_dir(s.model_tag, s.artifact_dir)})
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


S = _served_dir(S)

from serving.artifact import load_artifact  # noqa: E402
from serving.guard import ClientErrorLogFilter, Guard  # noqa: E402
from serving.recommender import BadRequest, NotFoundError, RecommenderEngine  # noqa: E402
from serving.runtime import OnnxEncoder  # noqa: E402
from serving.schemas import (  # noqa: E402
    ERROR_RESPONSES,
    EmbedRequest,
    Item,
    ItemRequest,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
    error_schema,
)

log = logging.getLogger("bentoml.recsys.service")  # BentoML configures this tree
API_PATHS = frozenset({"/recommend", "/rank", "/item", "/embed"})
READY = threading.Event()  # set by a worker once its engine is loaded and warm

# Custom Prometheus metrics on /metrics (bentoml.metrics: lazy, multiprocess-safe). The engine
# measures (serving/recommender.py never imports bentoml); `_observer` records.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METRICS = {
    "model_seconds": bentoml.metrics.Histogram(
        name="recsys_model_seconds", documentation="ONNX Runtime time of one model call",
        labelnames=["model_kind"], buckets=_SECONDS),
    "retrieval_seconds": bentoml.metrics.Histogram(
        name="recsys_retrieval_seconds", documentation="Faiss search (/recommend) or exact "
        "scoring (/rank) time of one request", labelnames=["model_kind"], buckets=_SECONDS),
    "unknown_items": bentoml.metrics.Counter(
        name="recsys_unknown_items", documentation="item ids not in the served catalogue "
        "(ignored in a history, refused as a candidate, dropped by /embed)",
        labelnames=["model_kind"]),
    "truncated_histories": bentoml.metrics.Counter(
        name="recsys_truncated_histories", documentation="requests whose history was longer "
        "than the model's max_len (the newest items were read)", labelnames=["model_kind"]),
}


def preflight() -> None:
    """Open the artifact the workers will serve (verify, read, check the ONNX graph's contract)
    in the `bentoml serve` process; one line and exit code 2 when it is unusable."""
    for name in unknown_variables():
        print(f"warning: {name} is not a serving setting (ignored)", file=sys.stderr)
    try:
        artifact = load_artifact(S.artifact_dir, S.model_file, verify=S.verify_artifact)
        OnnxEncoder.from_settings(S, artifact.onnx_path, artifact.max_len,
                                  int(artifact.manifest["hidden_size"]))
    except CompressorError as e:
        print(f"error: cannot serve the artifact: {e}", file=sys.stderr)  # e names the path
        raise SystemExit(2) from None


def _answer(route: str, schema: type, fn: Callable[..., dict], *args) -> object:
    """Run an engine call; its errors become `{"error": message}` with 400 / 404 and one INFO
    log line (a client's mistake: no traceback)."""
    try:
        return schema(**fn(*args))
    except BadRequest as e:
        log.info("400 %s: %s", route, str(e)[:300])  # one short line per client mistake
        return JSONResponse({"error": str(e)}, status_code=400)
    except NotFoundError as e:
        log.info("404 %s: %s", route, str(e)[:300])
        return JSONResponse({"error": str(e)}, status_code=404)


def _embed_api() -> Callable:
    """/embed is adaptively batched only with RECSYS_BATCHING=1 (measured slower on CPU, see
    serving/README.md); a batch then holds at least one whole accepted request, so the
    dispatcher never refuses a single request for its size."""
    if S.batching:
        return bentoml.api(input_spec=EmbedRequest, batchable=True, batch_dim=0,
                           max_batch_size=S.embed_batch_size, max_latency_ms=S.batch_max_latency_ms)
    return bentoml.api(input_spec=EmbedRequest)


@bentoml.service(name="recommender", workers=S.workers, threads=S.threads,
                 traffic={"timeout": S.request_timeout_s}, http={"host": S.host},
                 logging={"access": {"enabled": S.access_log}})
class Recommender:
    if S.model_tag:  # the served artifact as a Model Store model: `bentoml build` packs it
        artifact_model = bentoml.models.BentoModel(S.model_tag)

    @bentoml.on_deployment
    def _check_artifact() -> None:
        """Once per `bentoml serve`, before the workers start (not at `bentoml build`)."""
        if S.preflight:
            preflight()

    def __init__(self) -> None:
        logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLogFilter())
        self.engine: RecommenderEngine | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="embed")
        threading.Thread(target=self._load, name="load-engine", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = RecommenderEngine.from_settings(S)
            engine.recommend(history=[engine.artifact.items[0]], k=1)  # warm-up before /readyz
        except Exception as e:  # the parent's preflight passed: say what changed, then stop
            log.error("cannot serve the artifact: %s", (str(e).splitlines() or [repr(e)])[0][:300])
            logging.shutdown()
            os._exit(3)
        engine.observer = self._observer(str(engine.model_info["kind"]))  # after the warm-up
        self.engine = engine
        READY.set()

    @staticmethod
    def _observer(kind: str) -> Callable[[str, float], None]:
        histograms = {n: m.labels(model_kind=kind) for n, m in METRICS.items() if n.endswith("_seconds")}
        counters = {n: m.labels(model_kind=kind) for n, m in METRICS.items() if n not in histograms}

        def observe(name: str, value: float) -> None:
            if name in histograms:
                histograms[name].observe(value)
            else:
                counters[name].inc(value)
        return observe

    def __is_ready__(self) -> bool:
        return READY.is_set()

    def _encode(self) -> Callable[[list[list[int]]], np.ndarray] | None:
        """The model call: local ONNX Runtime, or the batched /embed API when RECSYS_BATCHING=1."""
        if not S.batching:
            return None
        items = self.engine.artifact.items
        ns = self.engine.artifact.num_special
        client = self.to_sync  # set by the server: calls go through the batching dispatcher
        return lambda rows: np.asarray(client.embed([[items[t - ns] for t in r] for r in rows]), dtype=np.float32)

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    def recommend(self, user_id: int | str | None = None, history: list[int | str] | None = None,
                  k: int = 10, exclude_seen: bool = True) -> RecommendResponse:
        """Top-k items for a known user or an explicit history of item ids."""
        return _answer("/recommend", RecommendResponse, self.engine.recommend, user_id, history, k,
                       exclude_seen, self._encode())

    @bentoml.api(input_spec=RankRequest, output_spec=RankResponse)
    def rank(self, user_id: int | str | None = None, history: list[int | str] | None = None,
             candidates: list[int | str] | None = None) -> RankResponse:
        """The candidate items in descending score order for a known user or a history."""
        return _answer("/rank", RankResponse, self.engine.rank, user_id, history, candidates, self._encode())

    @bentoml.api(input_spec=ItemRequest, output_spec=Item)
    def item(self, item_id: int | str) -> Item:
        """An item's metadata (title, genres)."""
        return _answer("/item", Item, self.engine.item, item_id)

    @_embed_api()
    async def embed(self, histories: list[list[int | str]]) -> np.ndarray:
        """Query vectors (B, H) for histories of item ids. Unknown ids are dropped; a history with
        no known item gets the zero vector."""
        # Its own thread: the API threads may all be waiting on this call (RECSYS_BATCHING=1).
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self.engine.encode_items, histories)


def openapi() -> dict:
    """BentoML's spec plus what it cannot know: the error bodies and statuses of serving/guard.py
    and `_answer`, the Retry-After header, the one-of user_id/history rule, and /embed's response
    shape (BentoML describes any ndarray as a flat array of numbers; it is one row per history)."""
    spec = json.loads(json.dumps(Recommender.openapi_spec.asdict()))  # plain JSON: string keys
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    body = error_schema()
    schemas.update(body.pop("$defs", {}))
    schemas["ErrorBody"] = body
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    spec["paths"]["/embed"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "type": "array", "description": "one query vector (hidden_size floats) per history, in request order",
        "items": {"type": "array", "items": {"type": "number"}}}
    for path in API_PATHS:
        op = spec["paths"][path]["post"]
        for code, text in ERROR_RESPONSES.items():
            if code == 404 and path == "/embed":
                continue
            op["responses"][str(code)] = {"description": text, "content": ref}
        op["responses"]["503"]["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        if path in ("/recommend", "/rank"):
            from serving.schemas import ONE_OF_USER_OR_HISTORY
            op["requestBody"]["content"]["application/json"]["schema"]["oneOf"] = ONE_OF_USER_OR_HISTORY
    return spec


Recommender.add_asgi_middleware(
    Guard, api_paths=API_PATHS, max_body_bytes=S.max_body_bytes,
    max_concurrency=S.concurrency_per_worker, retry_after_s=S.retry_after_s, ready=READY.is_set,
    openapi=openapi, unlimited_paths=frozenset({"/embed"}) if S.batching else frozenset())
