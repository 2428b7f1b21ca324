"""Filters that turn users' raw logs into implicit feedback, each recording what it removed.

Applied in this order by `apply_filters` (DataConfig.load), before the protocol:
  min_rating   keep interactions rated at least this (explicit ratings -> implicit feedback)
  repeats      drop repeated (user, item) pairs after the first in time (unless kept: music, grocery)
  min counts   drop users / items with fewer interactions than asked; with `kcore`, repeat both
               until neither removes anything (every user and item then meets its minimum)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from compressor.data.loaders import Interactions
from compressor.errors import DataError


def _step(name: str, before: pd.DataFrame, after: pd.DataFrame) -> dict:
    return {"filter": name, "removed_interactions": int(len(before) - len(after)),
            "removed_users": int(before["user"].nunique() - after["user"].nunique()),
            "removed_items": int(before["item"].nunique() - after["item"].nunique()),
            "left_interactions": int(len(after))}


def _first_in_time(events: pd.DataFrame) -> pd.DataFrame:
    """The protocol's dedupe: per (user, item) the earliest, ties by file order."""
    order = events.assign(_order=np.arange(len(events))).sort_values(["user", "timestamp", "_order"], kind="mergesort")
    keep = ~order.duplicated(["user", "item"], keep="first")
    return events.loc[np.sort(order.index[keep.to_numpy()])]


def _min_counts(events: pd.DataFrame, min_user: int, min_item: int, kcore: bool) -> tuple[pd.DataFrame, int]:
    rounds = 0
    while True:
        rounds += 1
        before = len(events)
        if min_user > 1:
            users = events["user"].value_counts()
            events = events[events["user"].isin(users.index[users >= min_user])]
        if min_item > 1:
            items = events["item"].value_counts()
            events = events[events["item"].isin(items.index[items >= min_item])]
        if not kcore or len(events) == before:
            return events, rounds


def apply_filters(inter: Interactions, min_rating: float | None = None, keep_repeats: bool = False,
                  min_user_interactions: int = 1, min_item_interactions: int = 1, kcore: bool = False) -> Interactions:
    """`inter` filtered; `filters` lists each step that ran with what it removed."""
    events, steps = inter.events, list(inter.filters)
    if min_rating is not None:
        if "rating" not in events.columns:
            raise DataError(f"{inter.source}: data.min_rating needs a rating column (map it with data.columns.rating)")
        kept = events[pd.to_numeric(events["rating"], errors="coerce") >= min_rating]
        steps.append(_step(f"rating >= {min_rating:g}", events, kept))
        events = kept
    if not keep_repeats:
        kept = _first_in_time(events)
        if len(kept) < len(events):
            steps.append(_step("repeated (user, item): first kept", events, kept))
        events = kept
    if min_user_interactions > 1 or min_item_interactions > 1:
        kept, rounds = _min_counts(events, min_user_interactions, min_item_interactions, kcore)
        name = (f"{'k-core' if kcore else 'minimum counts'}: users >= {min_user_interactions}, "
                f"items >= {min_item_interactions}" + (f" ({rounds} rounds)" if kcore else ""))
        steps.append(_step(name, events, kept))
        events = kept
    if events.empty:
        raise DataError(f"{inter.source}: the filters removed every interaction ({steps[-1]['filter']} "
                        "left none); loosen them")
    events = events.reset_index(drop=True)
    return Interactions(events, inter.items, inter.name, inter.source, steps)
