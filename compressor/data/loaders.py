"""Readers for the interaction formats users have, all returning one `Interactions` table.

Supported (detected from the folder's files, or named with `fmt=`):
  ml-latest  `ratings.csv` [+ `movies.csv`]         (ml-latest-small, 20M, 25M, 32M, latest)
  ml-100k    `u.data` [+ `u.item`]
  ml-1m      `ratings.dat` [+ `movies.dat`]         (also 10M)
  generic    a CSV/Parquet of user, item, timestamp[, rating] [+ an item file]
"""

from __future__ import annotations

import hashlib
import io
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from compressor.errors import DataError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "datasets"
BUNDLED = {"ml-latest-small": BUNDLED_DIR / "ml-latest-small"}
# Downloadable by name for users with network access (never used by tests or CI).
DOWNLOADS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-20m": "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
    "ml-25m": "https://files.grouplens.org/datasets/movielens/ml-25m.zip",
}
CACHE_DIR = Path.home() / ".cache" / "recsys-compressor"
FORMATS = ("ml-latest", "ml-100k", "ml-1m", "generic")


@dataclass
class Interactions:
    """All interactions (`user`, `item`, `timestamp`[, `rating`]) and item metadata
    (`item`, `title`, `genres`), with item and user ids as the dataset spells them."""

    events: pd.DataFrame
    items: pd.DataFrame
    name: str
    source: str
    filters: list[dict] = field(default_factory=list)  # what each filter removed (compressor.data.filters)

    def fingerprint(self) -> str:
        """A short hash of the events, so artifacts can say which data built them."""
        h = hashlib.sha256()
        h.update(pd.util.hash_pandas_object(self.events[["user", "item", "timestamp"]], index=False).values.tobytes())
        return h.hexdigest()[:16]


def _normalise_ids(col: pd.Series) -> pd.Series:
    """Integer ids stay integers (MovieLens); anything else becomes a string."""
    if pd.api.types.is_integer_dtype(col):
        return col.astype("int64")
    as_num = pd.to_numeric(col, errors="coerce")
    if as_num.notna().all() and (as_num == as_num.round()).all():
        return as_num.astype("int64")
    return col.astype(str)


def _finish(events: pd.DataFrame, items: pd.DataFrame | None, name: str, source: str) -> Interactions:
    missing = {"user", "item", "timestamp"} - set(events.columns)
    if missing:
        raise DataError(f"{source}: missing columns {sorted(missing)} (have {list(events.columns)})")
    events = events.dropna(subset=["user", "item", "timestamp"]).copy()
    if events.empty:
        raise DataError(f"{source}: no interactions")
    events["user"] = _normalise_ids(events["user"])
    events["item"] = _normalise_ids(events["item"])
    events["timestamp"] = pd.to_numeric(events["timestamp"], errors="raise").astype("int64")
    keep = ["user", "item", "timestamp"] + (["rating"] if "rating" in events.columns else [])
    events = events[keep].reset_index(drop=True)
    if items is None:
        items = pd.DataFrame({"item": pd.unique(events["item"])})
    items = items.copy()
    items["item"] = _normalise_ids(items["item"])
    if "title" not in items.columns:
        items["title"] = items["item"].astype(str)
    if "genres" not in items.columns:
        items["genres"] = ""
    items["genres"] = items["genres"].fillna("").astype(str)
    items["title"] = items["title"].fillna("").astype(str)
    items = items[["item", "title", "genres"]].drop_duplicates("item").reset_index(drop=True)
    return Interactions(events=events, items=items, name=name, source=source)


def _read_ml_latest(folder: Path) -> Interactions:
    events = pd.read_csv(folder / "ratings.csv").rename(
        columns={"userId": "user", "movieId": "item"}
    )
    items = None
    if (folder / "movies.csv").exists():
        items = pd.read_csv(folder / "movies.csv").rename(columns={"movieId": "item"})
    return _finish(events, items, folder.name, str(folder))


_ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _read_ml_100k(folder: Path) -> Interactions:
    events = pd.read_csv(
        folder / "u.data", sep="\t", header=None, names=["user", "item", "rating", "timestamp"]
    )
    items = None
    if (folder / "u.item").exists():
        raw = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1")
        flags = raw.iloc[:, 5 : 5 + len(_ML100K_GENRES)].to_numpy()
        genres = ["|".join(g for g, f in zip(_ML100K_GENRES, row, strict=False) if f == 1) for row in flags]
        items = pd.DataFrame({"item": raw[0], "title": raw[1], "genres": genres})
    return _finish(events, items, folder.name, str(folder))


def _read_ml_1m(folder: Path) -> Interactions:
    events = pd.read_csv(
        folder / "ratings.dat", sep="::", engine="python", header=None,
        names=["user", "item", "rating", "timestamp"],
    )
    items = None
    if (folder / "movies.dat").exists():
        items = pd.read_csv(
            folder / "movies.dat", sep="::", engine="python", header=None,
            names=["item", "title", "genres"], encoding="latin-1",
        )
    return _finish(events, items, folder.name, str(folder))


_USER_COLS = ("user", "user_id", "userid", "userId")
_ITEM_COLS = ("item", "item_id", "itemid", "itemId", "movieId", "product_id")
_TIME_COLS = ("timestamp", "time", "ts", "datetime", "date")


PARQUET_BATCH_ROWS = 1 << 20  # rows converted to pandas at a time: the Arrow copy stays one batch


def _read_parquet(path: Path, columns: list[str] | None) -> pd.DataFrame:
    """Only `columns` (all when None), one batch of row groups at a time, so the whole file is never
    held twice (Arrow and pandas)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install '.[parquet]')") from e
    f = pq.ParquetFile(path)
    if columns is not None and (missing := [c for c in columns if c not in f.schema_arrow.names]):
        raise DataError(f"{path}: no column {missing[0]!r} (has {f.schema_arrow.names})")
    parts = [b.to_pandas() for b in f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)]
    return pd.concat(parts, ignore_index=True) if parts else f.schema_arrow.empty_table().to_pandas()


def _read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return _read_parquet(path, columns)
    sep = "\t" if path.suffix in (".tsv", ".tab") else ","
    return pd.read_csv(path, sep=sep, usecols=columns)


def _rename_first(df: pd.DataFrame, candidates: tuple[str, ...], to: str) -> pd.DataFrame:
    for c in candidates:
        if c in df.columns:
            return df.rename(columns={c: to})
    return df


def _read_generic(path: Path, items_path: Path | None = None, columns: dict[str, str] | None = None) -> Interactions:
    """A table of user, item, timestamp[, rating]; `path` is the file, or a folder holding
    `interactions.(csv|tsv|parquet)` and optionally `items.(csv|tsv|parquet)`. `columns` names the
    file's own columns ({"user": "customer_id", "item": "sku", ...}); without it they are guessed
    from common names. With it only those columns are read (the item file's id column is
    `columns["item"]` too when it has one, else a common name)."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.stem == "interactions" and p.suffix in (".csv", ".tsv", ".parquet")]
        if not found:
            raise DataError(f"{path}: no interactions.csv/.tsv/.parquet in this folder")
        path = found[0]
    if columns:
        try:
            events = _read_table(path, list(columns.values())).rename(columns={v: k for k, v in columns.items()})
        except ValueError as e:  # CSV usecols names a column the file lacks
            raise DataError(f"{path}: data.columns {columns}: {e}") from e
    else:
        events = _read_table(path)
    events = _rename_first(events, _USER_COLS, "user")
    events = _rename_first(events, _ITEM_COLS, "item")
    events = _rename_first(events, _TIME_COLS, "timestamp")
    if "timestamp" in events.columns and not pd.api.types.is_numeric_dtype(events["timestamp"]):
        events["timestamp"] = pd.to_datetime(events["timestamp"]).astype("int64") // 10**9
    if items_path is None:
        cands = [p for p in sorted(folder.iterdir()) if p.stem == "items" and p.suffix in (".csv", ".tsv", ".parquet")]
        items_path = cands[0] if cands else None
    items = None
    if items_path is not None:
        items = _read_table(items_path)
        if columns and columns.get("item") in items.columns:
            items = items.rename(columns={columns["item"]: "item"})
        items = _rename_first(items, _ITEM_COLS, "item")
        if "item" not in items.columns:
            raise DataError(f"{items_path}: the item file needs an item id column")
    return _finish(events, items, path.stem if path.stem != "interactions" else folder.name, str(path))


_READERS = {"ml-latest": _read_ml_latest, "ml-100k": _read_ml_100k, "ml-1m": _read_ml_1m, "generic": _read_generic}


def detect_format(path: Path) -> str:
    """Name the format of a folder (or file) from the files it holds."""
    if path.is_file():
        return "generic"
    names = {p.name for p in path.iterdir()}
    if "ratings.csv" in names:
        return "ml-latest"
    if "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        return "ml-1m"
    if any(n.startswith("interactions.") for n in names):
        return "generic"
    raise DataError(
        f"{path}: unknown data format (expected ratings.csv, u.data, ratings.dat or interactions.csv)"
    )


def download_movielens(name: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Fetch a MovieLens release by name into the cache (needs network; never used in tests)."""
    if name not in DOWNLOADS:
        raise DataError(f"unknown dataset name {name!r}; known: {sorted(BUNDLED) + sorted(DOWNLOADS)}")
    target = cache_dir / name
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(DOWNLOADS[name], timeout=60) as r:
            payload = r.read()
    except OSError as e:
        raise DataError(f"could not download {name}: {e}") from e
    tmp = cache_dir / f".{name}.partial"
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        z.extractall(tmp)
    inner = next(p for p in tmp.iterdir() if p.is_dir())
    inner.rename(target)
    return target


def resolve_data_path(name_or_path: str | Path) -> Path:
    """A bundled name, a downloadable MovieLens name, or a path on disk."""
    s = str(name_or_path)
    if s in BUNDLED:
        return BUNDLED[s]
    path = Path(s).expanduser()
    if path.exists():
        return path
    if s in DOWNLOADS:
        return download_movielens(s)
    raise DataError(f"no such dataset or path: {s} (bundled: {', '.join(BUNDLED)})")


def load_interactions(name_or_path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> Interactions:
    """Load a dataset by bundled name or path; `fmt` is `auto` or one of FORMATS; `columns` maps
    user/item/timestamp/rating to a generic file's own column names."""
    path = resolve_data_path(name_or_path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(('auto',) + FORMATS)}")
    if columns and fmt != "generic":
        raise DataError(f"{path}: data.columns applies to the generic format (a CSV/Parquet table), not {fmt}")
    try:
        data = _read_generic(path, columns=columns) if columns else _READERS[fmt](path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise DataError(f"{path}: could not read as {fmt}: {e}") from e
    except FileNotFoundError as e:
        raise DataError(f"{path}: {fmt} data needs {Path(e.filename).name}") from e
    if str(name_or_path) in BUNDLED:
        data.name = str(name_or_path)
    return data
