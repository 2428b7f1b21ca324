"""Data: loaders for the formats users have, the item vocabulary, and the protocol."""

from compressor.data.loaders import FORMATS, Interactions, load_interactions
from compressor.data.protocol import (
    RecData,
    Split,
    left_pad,
    prepare,
    training_windows,
    window_batches,
)
from compressor.data.vocab import PAD_ID, VOCAB_FILE, ItemVocab

__all__ = [
    "FORMATS", "Interactions", "load_interactions", "RecData", "Split", "left_pad", "prepare",
    "training_windows", "window_batches", "PAD_ID", "VOCAB_FILE", "ItemVocab",
]
