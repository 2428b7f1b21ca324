"""Request and response models of the recommendation service (their descriptions are the API docs).

Requests are flat JSON objects (`{"user_id": 1, "k": 5}`); unknown fields are rejected so a typo
never silently falls back to a default. Types are strict: an id is a JSON integer or a short
string (`true` is not the id 1), `k` an integer, `exclude_seen` a boolean. Every list is bounded.
Item ids are the dataset's own ids (MovieLens movieId), never model token ids. Limits come from
serving/settings.py, read once, at import.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from serving.settings import get_settings

_S = get_settings()
MAX_K = _S.max_k
MAX_CANDIDATES = _S.max_candidates
MAX_HISTORY = _S.max_history  # request size cap, not the model's max_len
MAX_EMBED_ROWS = _S.max_embed_rows
MAX_ID_CHARS = 64  # MovieLens ids are integers; a string id is a short name, never a document

ItemId = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]
UNKNOWN_ITEMS_POLICY = (
    "Unknown item ids in `history` are IGNORED: the request is answered from the known items and "
    "each ignored id is named in `warnings` (a 400 only when no item of the history is known). "
    "A history longer than the model's max_len is cut to its newest max_len items "
    "(`truncated_history`: true); every item of the full history still counts as seen."
)
# JSON Schema of the one-of rule the validator below enforces (shown in /docs.json).
ONE_OF_USER_OR_HISTORY = [{"required": ["user_id"], "not": {"required": ["history"]}},
                          {"required": ["history"], "not": {"required": ["user_id"]}}]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": ONE_OF_USER_OR_HISTORY})

    user_id: ItemId | None = Field(
        None, description="a user of the served dataset; the history is that user's full history "
                          "(exactly one of user_id and history)",
        examples=[1])
    history: list[ItemId] | None = Field(
        None, min_length=1, max_length=MAX_HISTORY,
        description=f"the dataset's item ids, oldest first (instead of user_id; 1..{MAX_HISTORY}). "
                    + UNKNOWN_ITEMS_POLICY,
        examples=[[1, 3, 6, 47, 50]])

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendRequest(_Request):
    """Top-k items for a known user or an explicit history."""

    k: StrictInt = Field(10, ge=1, le=MAX_K, description=f"how many items to return (1..{MAX_K})")
    exclude_seen: StrictBool = Field(True, description="leave out items of the history")


class RankRequest(_Request):
    """Score and order an explicit list of candidate items for a user or history."""

    candidates: list[ItemId] = Field(
        ..., min_length=1, max_length=MAX_CANDIDATES,
        description=f"item ids to rank (1..{MAX_CANDIDATES}); unknown ids are REJECTED with a 400 "
                    "naming them, duplicates are ranked once",
        examples=[[318, 296, 2571]])


class ItemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: ItemId = Field(..., description="the dataset's item id", examples=[1])


class EmbedRequest(BaseModel):
    """Query vectors for up to MAX_EMBED_ROWS histories."""

    model_config = ConfigDict(extra="forbid")
    histories: list[Annotated[list[ItemId], Field(min_length=1, max_length=MAX_HISTORY)]] = Field(
        ..., min_length=1, max_length=MAX_EMBED_ROWS,
        description=f"1..{MAX_EMBED_ROWS} non-empty histories of item ids (a longer request is a 400 "
                    "naming this limit; split it)",
        examples=[[[1, 3, 6], [47, 50]]])


class Item(BaseModel):
    item_id: ItemId
    title: str
    genres: str = Field(description="as the dataset spells them, e.g. 'Adventure|Animation'")


class ScoredItem(Item):
    score: float = Field(description="inner product of the query vector and the item embedding (+ bias)")


class ModelInfo(BaseModel):
    """Which artifact answered: enough to tell teacher from student in logs and benchmarks."""

    kind: str
    architecture: str
    num_layers: int
    teacher_layers: list[int] | None = None
    parameters: int
    max_len: int
    num_items: int
    onnx_file: str
    index: str = Field(description="Faiss index type serving retrieval")
    data: str
    data_fingerprint: str
    created_at: str


class RecommendResponse(BaseModel):
    items: list[ScoredItem] = Field(description="best first")
    model: ModelInfo
    truncated_history: bool = Field(description="the history was cut to the model's max_len")
    warnings: list[str] = Field(default_factory=list)


class RankResponse(RecommendResponse):
    """`items` are the candidates in descending score order."""


# -- error bodies (declared in /docs.json; serving/guard.py and service.py produce them) ----------


class ValidationDetail(BaseModel):
    type: str
    loc: list[int | str]
    msg: str


class ErrorBody(BaseModel):
    """Every error: one readable sentence; a short prefix of a client's value at most."""

    error: str
    detail: list[ValidationDetail] | None = Field(
        None, description="schema violations, one per field (400 from request validation only)")


ERROR_RESPONSES: dict[int, str] = {
    400: "bad input: invalid JSON, a wrong type, an unknown field, a limit exceeded (the message "
         "names the limit) or a request that cannot be answered",
    404: "unknown user_id or item_id",
    413: "request body larger than RECSYS_MAX_BODY_BYTES",
    415: "Content-Type is not application/json",
    503: "overloaded (more than RECSYS_MAX_CONCURRENCY requests in flight) or not ready yet; "
         "retry after the Retry-After header's seconds",
    504: "not answered within RECSYS_REQUEST_TIMEOUT_S",
}


def error_schema() -> dict[str, Any]:
    return ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
