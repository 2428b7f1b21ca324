"""Request and response models of the recommendation service (their descriptions are the API docs).

Requests are flat JSON objects (`{"user_id": 1, "k": 5}`); unknown fields are rejected so a typo
never silently falls back to a default. Item ids are the dataset's own ids (MovieLens movieId),
never model token ids. Limits are read from the environment once, at import.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_K = int(os.environ.get("RECSYS_MAX_K", "100"))
MAX_CANDIDATES = int(os.environ.get("RECSYS_MAX_CANDIDATES", "1000"))
MAX_HISTORY = int(os.environ.get("RECSYS_MAX_HISTORY", "10000"))  # request size cap, not the model's max_len

ItemId = int | str
UNKNOWN_ITEMS_POLICY = (
    "Unknown item ids in `history` are IGNORED: the request is answered from the known items and "
    "each ignored id is named in `warnings` (a 400 only when no item of the history is known). "
    "A history longer than the model's max_len is cut to its newest max_len items "
    "(`truncated_history`: true); every item of the full history still counts as seen."
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: ItemId | None = Field(
        None, description="a user of the served dataset; the history is that user's full history",
        examples=[1])
    history: list[ItemId] | None = Field(
        None, min_length=1, max_length=MAX_HISTORY,
        description="the dataset's item ids, oldest first (instead of user_id). " + UNKNOWN_ITEMS_POLICY,
        examples=[[1, 3, 6, 47, 50]])

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendRequest(_Request):
    """Top-k items for a known user or an explicit history."""

    k: int = Field(10, ge=1, le=MAX_K, description=f"how many items to return (1..{MAX_K})")
    exclude_seen: bool = Field(True, description="leave out items of the history")


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
