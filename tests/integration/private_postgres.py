"""A private, throw-away PostgreSQL server for tests that pause or kill their database.

`PrivatePostgres` runs `initdb` and `postgres` (from /usr/lib/postgresql/*/bin or PATH) in a fresh temp dir,
listening only on a unix socket in that dir (no TCP port is bound), with trust auth and fsync off. `pause()`
stops the postmaster and every backend with SIGSTOP (postmaster first, so it forks no new ones); `resume()`
continues them. `stop()` resumes first, then shuts the server down and removes the dir.

Never use this machinery on the shared server at 127.0.0.1:5432: other tests use it.

Limits: Linux only (backends are found through /proc). PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system user (the dir is
chowned to it); without such a user, or without the binaries, `start()` raises `PrivatePostgresUnavailable`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.server import free_port


class PrivatePostgresUnavailable(RuntimeError):
    pass


def _children(parent: int) -> list[int]:
    """Direct children of ``parent`` (PostgreSQL's processes are all children of the postmaster)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("postgres")
    if found is None:
        raise PrivatePostgresUnavailable("no PostgreSQL server binaries (postgres, initdb) found")
    return Path(found).parent


@dataclass
class PrivatePostgres:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="loom-pg-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    paused: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@/postgres?host={self.root}&port={self.port}"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        try:
            user = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PrivatePostgresUnavailable("running as root and there is no 'postgres' user to run as") from exc
        os.chown(self.root, user.pw_uid, user.pw_gid)
        return {"user": user.pw_uid, "group": user.pw_gid}

    def start(self, timeout: float = 60.0) -> PrivatePostgres:
        bin_dir, run_as = _bin_dir(), self._run_as()
        subprocess.run(
            [bin_dir / "initdb", "-D", self.data_dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            **run_as,
        )
        log = open(self.root / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [
                bin_dir / "postgres",
                "-D", self.data_dir, "-p", str(self.port), "-k", self.root,
                "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=60",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            **run_as,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{(self.root / 'postgres.log').read_text()[-2000:]}")
            ready = subprocess.run(
                [bin_dir / "pg_isready", "-h", self.root, "-p", str(self.port), "-U", "postgres"], capture_output=True
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError("private postgres did not become ready")

    def _postmaster(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def _processes(self) -> list[int]:
        """The postmaster (from its pid file) first, then its children (backends and auxiliary processes)."""
        postmaster = self._postmaster()
        return [postmaster, *_children(postmaster)]

    def pause(self) -> None:
        postmaster = self._postmaster()
        os.kill(postmaster, signal.SIGSTOP)  # first: a stopped postmaster forks no new backends
        self.paused = True
        for child in _children(postmaster):
            _signal(child, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in reversed(self._processes()):
            _signal(pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is not None:
            try:
                self.resume()  # a stopped server cannot shut down
            except (OSError, ValueError):
                pass
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)
