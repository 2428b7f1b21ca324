"""`compressor recommend --engine ray`: the same rows as the local engine, on a local Ray with
2 CPUs; an actor killed mid-run is restarted and its block retried (and without restarts the
same kill fails the run, so the first test cannot pass by luck); a missing extra is one line."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest

from compressor.cli import main
from compressor.errors import CompressorError
from tests.conftest import tiny_interactions

K = 7


def _ray_processes() -> list[psutil.Process]:
    """This test process's Ray children (raylet, GCS, workers), dead ones left out."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(p.cmdline()[:3]).lower() + p.name():
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["user", "rank"]).reset_index(drop=True)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got, want = _sorted(got), _sorted(want)
    assert list(got.columns) == ["user", "rank", "item", "score"]
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    assert got[["user", "rank", "item"]].equals(want[["user", "rank", "item"]])
    assert np.allclose(got["score"], want["score"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def histories_file(tmp_path_factory):
    """The tiny slice's histories as a user brings them (user, items oldest first), built from the
    interactions here, not by the code under test; one unknown item and one user who has only
    unknown items (both dropped, as `prepare` drops them)."""
    events = tiny_interactions().events.sort_values(["user", "timestamp"], kind="mergesort")
    hist = events.groupby("user", sort=True)["item"].agg(list).reset_index().rename(columns={"item": "items"})
    hist.loc[0, "items"] = [*hist.loc[0, "items"], 987654321]
    hist = pd.concat([hist, pd.DataFrame({"user": [10**9], "items": [[987654321]]})], ignore_index=True)
    path = tmp_path_factory.mktemp("histories") / "histories.parquet"
    hist.to_parquet(path, row_group_size=16)  # several row groups, as a real file has
    return path


@pytest.fixture(scope="module")
def local_bundled(tiny_artifact_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "recs.parquet"
    assert main(["recommend", str(tiny_artifact_dir), "--data", "ml-latest-small", "--k", str(K), "--out", str(out),
                 "--batch-size", "64", "-q"]) == 0
    return pd.read_parquet(out)


def test_ray_engine_writes_the_local_engines_rows_and_stops_its_ray(local_bundled, tiny_artifact_dir, tmp_path):
    """The bundled data (610 users) through the CLI: a local Ray started with the machine's cores
    (2 here and in CI), two actors; every process it started is gone afterwards."""
    import ray

    assert not ray.is_initialized()
    out = tmp_path / "recs"
    assert main(["recommend", str(tiny_artifact_dir), "--data", "ml-latest-small", "--k", str(K), "--out", str(out),
                 "--engine", "ray", "--actors", "2", "--batch-size", "64", "-q"]) == 0
    assert out.is_dir() and all(p.suffix == ".parquet" for p in out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["recs"]  # no staging directory left
    got = pd.read_parquet(out)
    assert got["user"].nunique() == 610 and len(got) == 610 * K
    assert_same_rows(got, local_bundled)
    assert not ray.is_initialized()
    deadline = time.monotonic() + 20
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the Python-API tests (the engine uses a Ray it finds)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_histories(tiny_artifact_dir, histories_file, tmp_path_factory) -> pd.DataFrame:
    from compressor.recommend import recommend_all

    out = tmp_path_factory.mktemp("local_h") / "recs.parquet"
    recommend_all(tiny_artifact_dir, None, K, out, batch_size=4, progress=False, histories=histories_file)
    return pd.read_parquet(out)


def test_a_histories_file_scores_like_the_dataset(local_histories, tiny_artifact_dir, tmp_path):
    """The local engine on a histories file: the unknown item is dropped and the user with
    nothing known skipped, so the rows are the dataset's."""
    out = tmp_path / "recs.parquet"
    assert main(["recommend", str(tiny_artifact_dir), "--data", str(_ratings(tmp_path)), "--k", str(K),
                 "--out", str(out), "-q"]) == 0
    assert 10**9 not in set(local_histories["user"])
    assert_same_rows(local_histories, pd.read_parquet(out))


def _ratings(tmp_path):
    d = tmp_path / "ratings"
    d.mkdir()
    tiny_interactions().events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(d / "ratings.csv", index=False)
    return d


def run_ray(artifact, histories, out, **options):
    from compressor.recommend_ray import RayOptions, recommend_ray

    return recommend_ray(artifact, K, out, RayOptions(actors=2, batch_size=4, progress=False, **options),
                         histories=histories)


def test_a_killed_actor_is_restarted_and_its_block_retried(local_ray, local_histories, tiny_artifact_dir,
                                                           histories_file, tmp_path):
    """The first actor to start its second batch is SIGKILLed (`Crash`): Ray restarts it and runs
    its block again; every user is in the output exactly once, with the local engine's rows."""
    from compressor.recommend_ray import Crash

    marker = tmp_path / "crashed"
    r = run_ray(tiny_artifact_dir, histories_file, tmp_path / "recs", crash=Crash(1, str(marker)))
    killed = int(marker.read_text())  # the crash happened, in a process that is gone
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    got = pd.read_parquet(r.path)
    assert r.users == got["user"].nunique() == len(got) // K == 60
    assert_same_rows(got, local_histories)


def test_without_restarts_the_same_kill_fails_the_run_and_writes_nothing(local_ray, tiny_artifact_dir,
                                                                         histories_file, tmp_path):
    from compressor.recommend_ray import Crash

    with pytest.raises(CompressorError, match="the Ray job failed"):
        run_ray(tiny_artifact_dir, histories_file, tmp_path / "recs", crash=Crash(1, str(tmp_path / "crashed")),
                max_restarts=0)
    assert (tmp_path / "crashed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed"]  # no OUT, no staging directory


def test_an_actors_data_error_is_one_line(local_ray, tiny_artifact_dir, histories_file, tmp_path):
    """k larger than what a user has left unseen is found inside an actor (a histories file is
    not read ahead); it comes back as the actor's own message."""
    from compressor.recommend_ray import RayOptions, recommend_ray

    with pytest.raises(CompressorError, match=r"--k 3000: user .* has seen") as e:
        recommend_ray(tiny_artifact_dir, 3000, tmp_path / "recs", RayOptions(actors=1, progress=False),
                      histories=histories_file)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_a_missing_extra_is_one_line(tiny_artifact_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["recommend", str(tiny_artifact_dir), "--data", "ml-latest-small", "--out", str(tmp_path / "r"),
                 "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'recsys-compressor[ray]'" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--engine", "ray", "--actors", "0"], "--actors 0: give a positive number"),
    (["--engine", "ray", "--max-restarts", "-1"], "--max-restarts -1: give 0 or more"),
    (["--address", "auto"], "--address: only with --engine ray"),
    (["--engine", "ray", "--items-out", "items.csv"], "--items-out items.csv: give a .parquet file name"),
])
def test_bad_ray_options_are_one_line_errors(extra, message, tiny_artifact_dir, tmp_path, capsys):
    out = tmp_path / ("r.parquet" if "ray" not in extra else "r")
    assert main(["recommend", str(tiny_artifact_dir), "--data", "ml-latest-small", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_out_must_be_new_or_a_directory_of_parts(tiny_artifact_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["recommend", str(tiny_artifact_dir), "--data", "ml-latest-small", "--out", str(tmp_path / "mine"),
                 "--engine", "ray"]) == 2
    assert "is not a directory of Parquet parts" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_histories_file_needs_user_and_items(tiny_artifact_dir, tmp_path, capsys):
    bad = tmp_path / "h.parquet"
    pd.DataFrame({"user": [1], "item": [2]}).to_parquet(bad)
    assert main(["recommend", str(tiny_artifact_dir), "--histories", str(bad), "--out", str(tmp_path / "r"),
                 "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no column items" in err, err
    assert os.listdir(tmp_path) == ["h.parquet"]
