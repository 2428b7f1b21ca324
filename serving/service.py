"""BentoML service: recommendations from one artifact directory (teacher or student, same code).

    RECSYS_ARTIFACT_DIR=runs/default/student bentoml serve serving.service:Recommender --port 3000

Endpoints (flat JSON bodies; the schemas in `serving/schemas.py` are the OpenAPI docs at /docs):
  POST /recommend  {"user_id": 1} or {"history": [1, 50, 260], "k": 10, "exclude_seen": true}
  POST /rank       {"user_id": 1, "candidates": [318, 296, 2571]}
  POST /item       {"item_id": 1}
  POST /embed      {"histories": [[1, 50, 260]]}  query vectors (adaptively batched)
  GET  /healthz /livez /readyz /metrics (BentoML; request latency in
       bentoml_service_request_duration_seconds)
Errors: 400 for bad input, 404 for an unknown user or item; the body names the problem.
Environment: see serving/README.md (threads, index, limits, batching).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import bentoml
import numpy as np
from pydantic import Field
from starlette.responses import JSONResponse

from serving.recommender import BadRequest, NotFoundError, RecommenderEngine
from serving.schemas import (
    MAX_HISTORY,
    Item,
    ItemId,
    ItemRequest,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
)

# Sync APIs run in this many threads per worker (ONNX Runtime and Faiss release the GIL).
THREADS = int(os.environ.get("RECSYS_THREADS", "4"))
WORKERS = int(os.environ.get("RECSYS_WORKERS", "1"))
# One log line per request costs about as much as the student's model call; latency stays
# observable through /metrics. RECSYS_ACCESS_LOG=1 turns the per-request log back on.
ACCESS_LOG = os.environ.get("RECSYS_ACCESS_LOG", "0") in ("1", "true", "yes")
# Route the model call through the adaptively batched /embed API (measured: see serving/README.md).
BATCHING = os.environ.get("RECSYS_BATCHING", "0") in ("1", "true", "yes")
BATCH_MAX_SIZE = int(os.environ.get("RECSYS_BATCH_MAX_SIZE", "32"))
BATCH_MAX_LATENCY_MS = int(os.environ.get("RECSYS_BATCH_MAX_LATENCY_MS", "20"))


def _answer(schema, fn, *args):
    """Run an engine call; its errors become `{"error": message}` with 400 / 404 (a plain JSON
    object, as for validation errors, and no traceback in the log for a client's mistake)."""
    try:
        return schema(**fn(*args))
    except BadRequest as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    except NotFoundError as e:
        return JSONResponse({"error": str(e)}, status_code=404)


@bentoml.service(name="recommender", workers=WORKERS, threads=THREADS, traffic={"timeout": 30},
                 logging={"access": {"enabled": ACCESS_LOG}})
class Recommender:
    def __init__(self) -> None:
        self.engine = RecommenderEngine.from_env()
        self.engine.recommend(history=[self.engine.artifact.items[0]], k=1)  # warm-up before /readyz
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def _encode(self):
        """The model call: local ONNX Runtime, or the batched /embed API when RECSYS_BATCHING=1."""
        if not BATCHING:
            return None
        items = self.engine.artifact.items
        ns = self.engine.artifact.num_special
        client = self.to_sync  # set by the server: calls go through the batching dispatcher
        return lambda rows: np.asarray(client.embed([[items[t - ns] for t in r] for r in rows]), dtype=np.float32)

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    def recommend(self, user_id: ItemId | None = None, history: list[ItemId] | None = None, k: int = 10,
                  exclude_seen: bool = True) -> RecommendResponse:
        """Top-k items for a known user or an explicit history of item ids."""
        return _answer(RecommendResponse, self.engine.recommend, user_id, history, k, exclude_seen, self._encode())

    @bentoml.api(input_spec=RankRequest, output_spec=RankResponse)
    def rank(self, user_id: ItemId | None = None, history: list[ItemId] | None = None,
             candidates: list[ItemId] | None = None) -> RankResponse:
        """The candidate items in descending score order for a known user or a history."""
        return _answer(RankResponse, self.engine.rank, user_id, history, candidates, self._encode())

    @bentoml.api(input_spec=ItemRequest, output_spec=Item)
    def item(self, item_id: ItemId) -> Item:
        """An item's metadata (title, genres)."""
        return _answer(Item, self.engine.item, item_id)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    async def embed(
        self, histories: list[Annotated[list[ItemId], Field(min_length=1, max_length=MAX_HISTORY)]]
    ) -> np.ndarray:
        """Query vectors (B, H) for histories of item ids, adaptively batched. Unknown ids are
        dropped; a history with no known item gets the zero vector."""
        # Its own thread: the API threads may all be waiting on this call (RECSYS_BATCHING=1).
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self.engine.encode_items, histories)
