"""Item vocabulary: the catalogue as tokens of a causal LM.

Token 0 is padding; item tokens start at `num_special`. The file `item_vocab.json`
travels beside every model, teacher or student, and serving reads the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.atomic import atomic_write_json
from compressor.errors import ArtifactError
from compressor.ids import id_spellings

VOCAB_FILE = "item_vocab.json"
SPECIAL_TOKENS = ("[PAD]",)
PAD_ID = 0


@dataclass
class ItemVocab:
    """Maps the dataset's item ids to token ids and back."""

    items: list  # item id for token num_special + i, in token order
    special: tuple[str, ...] = SPECIAL_TOKENS
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {item: i + self.num_special for i, item in enumerate(self.items)}
        if len(self._index) != len(self.items):
            raise ValueError("item ids in a vocabulary must be unique")

    @property
    def num_special(self) -> int:
        return len(self.special)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def size(self) -> int:
        """Number of tokens, specials included: the model's `vocab_size`."""
        return self.num_special + len(self.items)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def __contains__(self, item) -> bool:
        return item in self._index

    def token(self, item) -> int:
        return self._index[item]

    def tokens(self, items) -> np.ndarray:
        return np.fromiter((self._index[i] for i in items), dtype=np.int64)

    def item(self, token: int):
        return self.items[int(token) - self.num_special]

    def coerce(self, item):
        """An item id as the vocabulary spells it (JSON clients may send "1" for 1; `compressor.ids`);
        unchanged when it is not in the vocabulary."""
        return next((key for key in id_spellings(item) if key in self._index), item)

    @classmethod
    def from_items(cls, items) -> ItemVocab:
        return cls(items=[i.item() if hasattr(i, "item") else i for i in items])

    def to_json(self) -> dict:
        return {"special_tokens": list(self.special), "pad_id": PAD_ID, "items": self.items}

    def save(self, directory: str | Path) -> Path:
        return atomic_write_json(Path(directory) / VOCAB_FILE, self.to_json(), indent=None, default=None)

    @classmethod
    def load(cls, directory: str | Path) -> ItemVocab:
        path = Path(directory) / VOCAB_FILE
        if not path.exists():
            raise ArtifactError(f"{directory}: no {VOCAB_FILE} (not a model directory of this project?)")
        try:
            raw = json.loads(path.read_text())
            return cls(items=list(raw["items"]), special=tuple(raw["special_tokens"]))
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable item vocabulary ({e})") from e

    def same_as(self, other: ItemVocab) -> bool:
        return self.items == other.items and self.special == other.special
