"""Item and user ids as clients spell them: one parser for serving, artifacts, the CLI and data.

A catalogue keeps each id as the dataset spells it (an int for MovieLens, a string such as a SKU
elsewhere); JSON clients may send 1 for "1" or "1" for 1. A string matches an int id only when it
is that int's canonical ASCII decimal: "²" and "٣" are digits to `str.isdigit` but no int to
`int()`, and "01" or " 1" are not exactly the id 1. Anything else is simply not in the catalogue
(the caller says "unknown"), never an exception. Standard library only: the Bento ships this file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)")


def id_spellings(value) -> tuple:
    """The keys `value` may be stored under, itself first: (1, "1") for 1, ("1", 1) for "1",
    ("sku-9",) for "sku-9"; () for a bool (True == 1 in Python) or anything not an int or str."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return ()
    if isinstance(value, int):
        return value, str(value)
    return (value, int(value)) if _DECIMAL.fullmatch(value) else (value,)


def lookup(mapping: Mapping, value):
    """`mapping`'s entry for the id `value` under any of its spellings, or None."""
    for key in id_spellings(value):
        found = mapping.get(key)
        if found is not None:
            return found
    return None


def parse_id(text: str) -> int | str:
    """An id read from text (a file, a command line): an int when it is a canonical decimal."""
    return int(text) if _DECIMAL.fullmatch(text) else text
