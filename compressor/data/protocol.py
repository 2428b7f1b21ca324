"""The evaluation protocol, implemented once and used by every stage.

- implicit feedback: every rating is an interaction; a repeated (user, item) keeps its first time
  (unless `keep_repeats`: then every repeat stays, and evaluation no longer excludes seen items,
  since re-consuming them is what such data predicts: music, grocery);
- each user's items in time order, ties broken stably by file order;
- leave-one-out: the last item is the test target, the second-to-last the validation target,
  the rest is training data (users with fewer than 3 items are training-only);
- full ranking over the whole catalogue, the user's input history excluded.

Histories are left-padded with the pad token, so the last position is always the newest item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from compressor.data.loaders import Interactions, load_interactions
from compressor.data.vocab import PAD_ID, ItemVocab
from compressor.errors import DataError

SPLITS = ("valid", "test")


@dataclass
class Split:
    """One evaluation split: for user i, rank `targets[i]` given `histories[i]`."""

    name: str
    users: list
    histories: list[np.ndarray]  # token ids, oldest first (never empty)
    targets: np.ndarray  # token ids
    exclude_seen: bool = True  # rank the target among unseen items only (False: data with repeats)

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, n: int, seed: int = 0) -> Split:
        """A random subset of `n` users (all when n >= len), order kept."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return Split(self.name, [self.users[i] for i in idx], [self.histories[i] for i in idx], self.targets[idx],
                     self.exclude_seen)


@dataclass
class RecData:
    """A dataset put through the protocol: vocabulary, per-user sequences, splits."""

    interactions: Interactions
    vocab: ItemVocab
    sequences: dict  # user id -> token ids in time order
    keep_repeats: bool = False  # sequences keep repeated items; splits then do not exclude seen items
    eval_users: int | None = None  # validation and test on this seeded sample of users (None: all)

    @property
    def name(self) -> str:
        return self.interactions.name

    def train_sequences(self) -> list[np.ndarray]:
        """What models may train on: each sequence minus its validation and test items."""
        return [s[:-2] if len(s) >= 3 else s for s in self.sequences.values() if len(s) >= 2]

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        cut = 2 if name == "valid" else 1
        users, hists, targets = [], [], []
        for u, s in self.sequences.items():
            if len(s) < 3:
                continue
            users.append(u)
            hists.append(s[: len(s) - cut])
            targets.append(s[len(s) - cut])
        split = Split(name, users, hists, np.asarray(targets, dtype=np.int64), exclude_seen=not self.keep_repeats)
        # the same users for both splits (one seed): validation and test stay comparable
        return split if self.eval_users is None else split.subset(self.eval_users, seed=0)

    def history(self, user) -> np.ndarray:
        """A known user's whole history (serving recommends what comes after all of it)."""
        return self.sequences[user]


def build_sequences(inter: Interactions, vocab: ItemVocab, keep_repeats: bool = False) -> dict:
    ev = inter.events.reset_index(drop=True)
    ev = ev.assign(_order=np.arange(len(ev)))
    ev = ev.sort_values(["user", "timestamp", "_order"], kind="mergesort")
    if not keep_repeats:
        ev = ev.drop_duplicates(["user", "item"], keep="first")
    tokens = vocab.tokens(ev["item"].tolist())
    users = ev["user"].to_numpy()
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])
    # numpy integers become Python ints; string ids (object arrays) are str already
    return {_python(users[a]): tokens[a:b] for a, b in zip(starts, ends, strict=True)}


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


def prepare(data: str | Path | Interactions, fmt: str = "auto", vocab: ItemVocab | None = None,
            keep_repeats: bool = False) -> RecData:
    """Load (if needed) and put a dataset through the protocol.

    With `vocab` given (a trained model's), interactions with items outside it are dropped, so
    a model is always evaluated over the catalogue it was trained on."""
    inter = data if isinstance(data, Interactions) else load_interactions(data, fmt)
    if vocab is None:
        # Token order: by first appearance in time, so ids are stable for a given file.
        ordered = inter.events.sort_values("timestamp", kind="mergesort")["item"]
        vocab = ItemVocab.from_items(pd_unique(ordered))
    else:
        known = inter.events["item"].map(lambda i: i in vocab)
        if not known.any():
            raise DataError(f"{inter.source}: no item of this data is in the model's vocabulary")
        inter = Interactions(inter.events[known.to_numpy()], inter.items, inter.name, inter.source)
    seqs = build_sequences(inter, vocab, keep_repeats)
    if not any(len(s) >= 3 for s in seqs.values()):
        raise DataError(f"{inter.source}: no user has the 3 interactions leave-one-out needs")
    return RecData(inter, vocab, seqs, keep_repeats)


def pd_unique(series) -> list:
    return pd.unique(series).tolist()


# batches sorted together by `window_batches(group_by_length=True)`: large enough to gather the
# short windows, small enough that batch composition stays random
GROUP_BATCHES = 32


def left_pad(seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the newest `max_len` tokens of each sequence and left-pad: (input_ids, attention_mask)."""
    out = np.full((len(seqs), max_len), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[i, -len(s):] = s
            mask[i, -len(s):] = 1
    return out, mask


def training_windows(
    seqs: list[np.ndarray], max_len: int, rng: np.random.Generator | None = None,
    per_sequence: int | None = None,
) -> list[np.ndarray]:
    """Cut sequences into windows of `max_len + 1` from the newest end, overlapping by one
    item, so every item after the first is predicted exactly once per epoch.

    With `rng`, each sequence's newest window gets a random length, which shifts every cut
    below it: an item is then predicted from a different amount of context each epoch.
    With `per_sequence`, only each sequence's newest `per_sequence` windows are kept (the recent
    past, where the validation and test items are): what makes an LLM epoch affordable on a CPU."""
    windows = []
    for s in seqs:
        end = len(s)
        first = rng is not None
        kept = 0
        while end >= 2 and (per_sequence is None or kept < per_sequence):
            kept += 1
            length = int(rng.integers(2, max_len + 2)) if first else max_len + 1
            first = False
            start = max(0, end - length)
            windows.append(s[start:end])
            end = start + 1
            if start == 0:
                break
    return windows


def window_batches(
    windows: list[np.ndarray], max_len: int, batch_size: int, rng: np.random.Generator | None,
    group_by_length: bool = False,
):
    """Yield (input_ids, attention_mask, labels) numpy batches; labels are -100 at padding.

    With `group_by_length`, windows are sorted by length inside groups of `GROUP_BATCHES` batches
    (the batch order is then shuffled again) and each batch is padded only to its own longest
    window: short windows (each user's newest cut, short histories) stop costing a full `max_len`
    of decoder compute. Dropping all-padding columns changes nothing else, since position ids
    are derived from the attention mask (`modeling.position_ids`)."""
    order = rng.permutation(len(windows)) if rng is not None else np.arange(len(windows))
    if group_by_length:
        group = batch_size * GROUP_BATCHES
        batches = []
        for a in range(0, len(order), group):
            chunk = order[a : a + group]
            chunk = chunk[np.argsort([-len(windows[i]) for i in chunk], kind="stable")]
            batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        batches = [order[a : a + batch_size] for a in range(0, len(order), batch_size)]
    for idx in batches:
        chunk = [windows[i] for i in idx]
        width = min(max_len, max(len(w) for w in chunk) - 1) if group_by_length else max_len
        ids, mask = left_pad([w[:-1] for w in chunk], width)
        labels, lmask = left_pad([w[1:] for w in chunk], width)
        labels[lmask == 0] = -100
        yield ids, mask, labels
