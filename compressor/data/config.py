"""`DataConfig`: the `data:` section of a run, what every stage reads (prepared once by the protocol)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.data import load_interactions
from compressor.data.filters import apply_filters
from compressor.data.loaders import BUNDLED, DOWNLOADS
from compressor.data.protocol import RecData, prepare


class ColumnMap(BaseModel):
    """A generic file's own column names for the fields the protocol reads."""

    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(None, description="the user id column (None: guessed from user, user_id, ...)")
    item: str | None = Field(None, description="the item id column, also in the item file (None: guessed)")
    timestamp: str | None = Field(None, description="the time column: numbers, or dates pandas parses")
    rating: str | None = Field(None, description="the rating column, for data.min_rating")

    def mapping(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class DataConfig(BaseModel):
    """The interactions every stage reads (prepared once by the protocol of compressor.data)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("ml-latest-small", description="bundled name, downloadable MovieLens name, or a path")
    format: str = Field("auto", description="auto, ml-latest, ml-100k, ml-1m or generic")
    max_users: int | None = Field(None, ge=3, description="keep only the first N users (by id): quick runs")
    eval_users: int | None = Field(
        None, ge=10, description="validate and test on a seeded random sample of this many users (None = all; "
        "every user still trains): full-catalogue ranking costs users x items per model, hours at 10^5 users "
        "x 10^6 items; the report states the sample")
    columns: ColumnMap | None = Field(None, description="generic format: the file's column names, e.g. "
                                      "{user: customer_id, item: sku, timestamp: ts}; only these are read")
    min_rating: float | None = Field(None, description="keep interactions rated at least this (explicit "
                                     "ratings -> implicit feedback); None keeps every rating")
    keep_repeats: bool = Field(False, description="keep repeated (user, item) interactions (music, grocery); "
                               "evaluation then ranks over all items, seen ones included")
    min_user_interactions: int = Field(1, ge=1, description="drop users with fewer interactions")
    min_item_interactions: int = Field(1, ge=1, description="drop items with fewer interactions")
    kcore: bool = Field(False, description="repeat the two minimum-count filters until neither removes anything")
    memory_budget_gib: float | None = Field(
        None, gt=0, description="peak memory the job may plan for (None = 80% of this machine's RAM): each "
        "stage's estimate from the data's shape (compressor.memory) is checked before training starts")

    @field_validator("name")
    @classmethod
    def _known_data(cls, v: str) -> str:
        """A name that is neither known nor a path fails here, not after the run directory exists."""
        if v not in BUNDLED and v not in DOWNLOADS and not Path(v).expanduser().exists():
            raise ValueError(f"no such dataset or path: {v} (names: {', '.join([*BUNDLED, *DOWNLOADS])})")
        return v

    def budget_bytes(self) -> int:
        """The memory budget in bytes; None means 80% of this machine's physical memory."""
        if self.memory_budget_gib is not None:
            return int(self.memory_budget_gib * 2**30)
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def load(self, vocab=None) -> RecData:
        inter = load_interactions(self.name, self.format, self.columns.mapping() if self.columns else None)
        if self.max_users is not None:
            users = sorted(inter.events["user"].unique())[: self.max_users]
            inter.events = inter.events[inter.events["user"].isin(users)].reset_index(drop=True)
        inter = apply_filters(inter, self.min_rating, self.keep_repeats, self.min_user_interactions,
                              self.min_item_interactions, self.kcore)
        data = prepare(inter, vocab=vocab, keep_repeats=self.keep_repeats)
        data.eval_users = self.eval_users
        return data
