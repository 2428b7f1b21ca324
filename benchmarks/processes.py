"""Start, watch and always stop the processes a benchmark runs: servers and load generators.

Every child gets its own session (process group), so it can be stopped as a whole even when
it has workers of its own (`bentoml serve` restarts failing workers forever and never exits
by itself); `ProcessGroup` stops everything it started on exit, also on Ctrl-C, SIGTERM or an
exception.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests

from compressor.errors import CompressorError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class RssSampler:
    """Samples `tree_rss(pid)` every `interval` seconds in a thread, between start() and stop()."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(tree_rss(self.pid))

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def _terminate_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class ProcessGroup:
    """Context manager owning child processes; SIGTERM to us becomes KeyboardInterrupt meanwhile."""

    def __init__(self, stop_timeout: float = 15.0):
        self.procs: list[subprocess.Popen] = []
        self.stop_timeout = stop_timeout
        self._old_handler = None

    def __enter__(self) -> ProcessGroup:
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, _terminate_signal)
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)

    def start(self, cmd: Sequence[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left after `stop_timeout` seconds."""
        try:
            family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = [proc.pid]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                continue
            break
        for pid in family[1:]:  # a worker that left the group must not outlive us either
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if proc in self.procs:
            self.procs.remove(proc)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    """Poll `url` until HTTP 200; returns seconds waited. Raises if the process dies or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise CompressorError(f"server exited with code {proc.returncode} before it was ready:\n{log_tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise CompressorError(f"server not ready at {url} after {timeout:.0f} s:\n{log_tail(log)}")


ROOT = Path(__file__).resolve().parents[1]
SERVICE = "serving.service:Recommender"


def bentoml_cmd(port: int, host: str = "127.0.0.1", service: str = SERVICE,
                python: Path | None = None) -> list[str]:
    """`bentoml serve` of this interpreter's environment (or of `python`'s), bound to `host`
    explicitly. `service` is an import path or a built Bento's tag."""
    import sys

    bentoml = Path(sys.executable).with_name("bentoml")
    serve = [str(python), "-m", "bentoml"] if python else [str(bentoml) if bentoml.exists() else "bentoml"]
    return [*serve, "serve", service, "--host", host, "--port", str(port)]


def server_env(home: Path, **recsys: str) -> dict[str, str]:
    """os.environ plus a BentoML home outside the project (inside it, a Bento build packs it), no
    telemetry, this checkout first on PYTHONPATH (so the server imports this code), and RECSYS_*
    settings."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "PYTHONPATH": path, **recsys}


class Server:
    """A started `bentoml serve`: its URL, process (group leader), log, the seconds it took to be
    ready, and the process group it runs in (where helpers such as load generators can start)."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, ready_s: float, group: ProcessGroup):
        self.url, self.proc, self.log, self.ready_s, self.group = url, proc, log, ready_s, group

    def worker_pids(self) -> list[int]:
        """Python processes under the server that import the service (its workers)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [k.pid for k in kids if "_bentoml_impl.worker" in " ".join(_cmdline(k))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


PORT_ATTEMPTS = 3  # starts of `bentoml serve` when a port was taken between choosing and binding it


@contextmanager
def bentoml_server(env: dict, log: Path, ready_timeout: float = 120.0, host: str = "127.0.0.1",
                   service: str = SERVICE, python: Path | None = None, cwd: Path = ROOT) -> Iterator[Server]:
    """`bentoml serve` on a free port of `host`, ready (/readyz 200) on entry; its whole process
    group is stopped on exit, also on failure. Raises CompressorError if it exits or is not
    ready in time (with the log's tail). `python` and `cwd`: serve from another environment and
    folder (a built Bento served where this project is not importable)."""
    with ProcessGroup() as group:
        for attempt in range(PORT_ATTEMPTS):
            port = free_port(host)
            proc = group.start(bentoml_cmd(port, host, service, python), log, env=env, cwd=cwd)
            url = f"http://{host}:{port}"
            try:
                ready_s = wait_ready(url + "/readyz", proc, ready_timeout, log)
                break
            except CompressorError:
                # A port found free (ours, or the one circus picks for its own sockets) can be
                # taken by another process before the bind: start again on fresh ports.
                if attempt + 1 == PORT_ATTEMPTS or "Address already in use" not in log_tail(log, 200):
                    raise
                group.stop(proc)
        yield Server(url, proc, log, ready_s, group)


def run_to_exit(cmd: Sequence[str], log: Path, env: dict, timeout: float) -> int | None:
    """Run `cmd` in its own process group; its exit code, or None (and the group stopped) if it
    is still running after `timeout` seconds."""
    with ProcessGroup(stop_timeout=5) as group:
        proc = group.start(cmd, log, env=env, cwd=ROOT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
