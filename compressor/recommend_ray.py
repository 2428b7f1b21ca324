"""`compressor recommend --engine ray`: batch scoring on Ray Data, on one machine or a cluster.

The pipeline:

    histories   a dataset's (the driver puts them in the object store) or a Parquet file or
                directory of (user, items) rows, read streaming (see `compressor.recommend`)
    blocks      of `block_users` users: the unit Ray schedules, and retries when it is lost
    map_batches a fixed pool of `ScoringActor`s, each holding one `BatchScorer` (one ONNX Runtime
                session and the item table: the local engine's scoring function), `batch_size`
                users per call
    write       Parquet parts (user, rank, item, score) into a staging directory beside OUT that
                replaces OUT once every block is written, so a failed run leaves no half output

Without an address it starts a local Ray with this machine's cores and a small object store and
stops it afterwards; with one (`--address auto` or `HOST:PORT`) it joins that cluster, whose nodes
must have this package (with the `ray` and `cpu` extras) installed and see the artifact, the
histories and OUT at the same paths (a shared file system). Progress is Ray Data's.

Resources: the actor pool asks for all but one of the cluster's logical CPUs, split between its
actors. Ray Data's read and write tasks need a CPU slot too, and a pool that holds every slot
leaves them waiting forever (seen on 2 cores: the first read never starts). Logical CPUs are
only slots: each actor's ONNX Runtime uses `threads` threads (default: CPUs / actors).

Failures: an actor that dies (killed, out of memory, node lost) is restarted by Ray, up to
`max_restarts` times per actor, and the blocks it held are run again; Ray Data passes each
finished block on once, so the output still holds every user exactly once (tested by killing an
actor mid-run). `Crash` is a fault-injection setting for that test and for rehearsals.

`ray` is imported here only, so the core install does not need it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from compressor.artifact import atomic_directory
from compressor.data.vocab import ItemVocab
from compressor.errors import CompressorError
from compressor.recommend import (
    BatchScorer,
    check_histories,
    check_k,
    check_onnx,
    check_options,
    histories_table,
)

RAY_EXTRA = "pip install 'recsys-compressor[ray]'"
BATCHES_PER_BLOCK = 4  # batches in a block, at most: a lost block costs this many calls again
BLOCKS_PER_ACTOR = 4  # at least this many blocks per actor on small inputs, so every actor works
ROWS_PER_FILE = 1_000_000  # output parts of about this many rows (~20 MB), not one per block


def import_ray():
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]; plain ray lacks pyarrow/pandas glue)
    except ImportError as e:
        raise CompressorError(f"--engine ray needs Ray Data, which is not installed ({RAY_EXTRA})") from e
    return ray


@dataclass(frozen=True)
class Crash:
    """Fault injection: the first actor to start its batch number `after_batches + 1` kills its
    own process with SIGKILL, once per `marker` (created atomically; it holds the pid)."""

    after_batches: int
    marker: str


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray; "auto" or HOST:PORT: join a cluster
    actors: int | None = None  # default: the cluster's logical CPUs
    batch_size: int = 256  # users per ONNX Runtime call
    threads: int | None = None  # ONNX Runtime threads per actor (default: CPUs / actors)
    max_restarts: int = 3  # per actor; 0 turns retries off (a dead actor fails the run)
    object_store_mb: int = 512  # a local Ray's object store (a cluster keeps its own)
    progress: bool = True
    crash: Crash | None = None

    def __post_init__(self) -> None:  # checked before any data is read
        if self.actors is not None and self.actors < 1:
            raise CompressorError(f"--actors {self.actors}: give a positive number")
        if self.max_restarts < 0:
            raise CompressorError(f"--max-restarts {self.max_restarts}: give 0 or more")
        if self.threads is not None and self.threads < 1:
            raise CompressorError(f"--threads {self.threads}: give a positive number")


@dataclass
class RayResult:
    path: Path  # the directory of parts
    users: int
    rows: int
    parts: int
    actors: int
    threads: int
    seconds: float  # the Ray job itself: start-up of Ray excluded


class ScoringActor:
    """A Ray Data actor: one `BatchScorer` for its whole life; each call scores one batch."""

    def __init__(self, artifact_dir: str, k: int, onnx_file: str | None, threads: int, crash: Crash | None):
        self.scorer = BatchScorer(artifact_dir, k, onnx_file, threads)
        self.crash = crash
        self.batches = 0

    def __call__(self, batch):
        if self.crash is not None and self.batches >= self.crash.after_batches:
            self._crash_once()
        self.batches += 1
        return self.scorer.rows_from_ids(batch)

    def _crash_once(self) -> None:
        try:
            fd = os.open(self.crash.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another actor (or this one before its restart) has crashed already
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9` from outside: no clean-up, block lost


def _connect(ray, options: RayOptions) -> bool:
    """Start or join Ray; True when this call started it (and so must stop it)."""
    if ray.is_initialized():  # a caller's own Ray (a notebook, a test): use it as it is
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an offline batch job reports nothing
    common = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if options.address:
            ray.init(address=options.address, **common)
        else:
            ray.init(num_cpus=len(os.sched_getaffinity(0)), object_store_memory=options.object_store_mb << 20,
                     **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--address {options.address}" if options.address else "a local Ray"
        raise CompressorError(f"{where}: Ray did not start ({' '.join(str(e).split())})") from e
    return True


def _cause(e: BaseException) -> CompressorError | None:
    """The CompressorError (bad data, k too large) an actor raised, under Ray's wrappers."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CompressorError) and type(e).__module__.startswith("compressor"):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def plan(cpus: float, actors: int | None, threads: int | None) -> tuple[int, int, float]:
    """(actors, ONNX Runtime threads per actor, logical CPUs per actor) for a cluster of `cpus`."""
    actors = actors or max(1, int(cpus))
    threads = threads or max(1, int(cpus // actors))
    spare = min(1.0, cpus / 2)  # one slot for Ray Data's reads and writes (half of a 1-CPU machine)
    return actors, threads, min(float(threads), (cpus - spare) / actors)


def recommend_ray(artifact_dir: str | Path, k: int, out: str | Path, options: RayOptions, data=None,
                  histories: str | Path | None = None, onnx_file: str | None = None) -> RayResult:
    """Score every user of `data` (a RecData) or of `histories` (a Parquet path) on Ray Data and
    write their top-k as a directory of Parquet parts at `out`."""
    out = check_options(out, k, options.batch_size, engine="ray")
    if (data is None) == (histories is None):
        raise CompressorError("give either data or histories")
    check_onnx(artifact_dir, onnx_file)
    if data is not None:
        check_k(k, data.vocab, data)
        table = histories_table(data)
        users = table.num_rows
    else:
        import pyarrow.dataset as pads

        histories = check_histories(histories, ItemVocab.load(artifact_dir))
        users = pads.dataset(histories, format="parquet").count_rows()  # from the footers
    ray = import_ray()
    started = _connect(ray, options)
    try:
        from ray.data import ActorPoolStrategy, DataContext

        actors, threads, actor_cpus = plan(ray.cluster_resources().get("CPU", 1.0), options.actors, options.threads)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = options.progress
        ctx.raise_original_map_exception = True  # an actor's DataError reaches us as itself
        block = max(1, min(options.batch_size * BATCHES_PER_BLOCK, math.ceil(users / (actors * BLOCKS_PER_ACTOR))))
        if data is not None:
            ds = ray.data.from_arrow([table.slice(a, block) for a in range(0, users, block)] or [table])
        else:
            ds = ray.data.read_parquet(str(Path(histories).resolve()), columns=["user", "items"])
            ds = ds.repartition(target_num_rows_per_block=block)
        with warnings.catch_warnings():
            # max_restarts has no named parameter yet in Ray 2.60-2.63 (the extra's range), only
            # the **ray_remote_args that Ray deprecates for 2.64
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            scored = ds.map_batches(
                ScoringActor, batch_size=options.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={"artifact_dir": str(Path(artifact_dir).resolve()), "k": k,
                                       "onnx_file": onnx_file, "threads": threads, "crash": options.crash},
                compute=ActorPoolStrategy(size=actors), num_cpus=actor_cpus, max_restarts=options.max_restarts)
        t0 = time.perf_counter()
        with atomic_directory(out) as staging:
            scored.write_parquet(str(staging), min_rows_per_file=ROWS_PER_FILE)
        seconds = time.perf_counter() - t0
    except Exception as e:  # ours, or Ray's wrappers: an actor's own error, or a job Ray gave up on
        cause = _cause(e)
        if cause is e:
            raise
        if cause is not None:  # the actor's message, without Ray's traceback around it
            raise type(cause)(str(cause).splitlines()[0]) from e  # Ray appends a retry note
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CompressorError(f"the Ray job failed ({type(e).__name__}: {first.strip()}); "
                              f"--max-restarts {options.max_restarts} allows that many restarts per actor") from e
    finally:
        if started:
            ray.shutdown()
    return _result(out, k, actors, threads, seconds)


def _result(out: Path, k: int, actors: int, threads: int, seconds: float) -> RayResult:
    import pyarrow.parquet as pq

    parts = sorted(out.glob("*.parquet"))
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    return RayResult(out, rows // k, rows, len(parts), actors, threads, seconds)
