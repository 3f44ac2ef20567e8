"""A real `loom serve` process for end-to-end tests: start on a free port in a temp data dir, wait, stop.

Limits: model weights come from the shared model cache (~/.cache/loom/models, built on first use).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def loom_cli(data_dir: Path, *argv: str) -> str:
    """What the real `loom` CLI prints for `argv`, run in this process against the database in `data_dir`."""
    from api.cli import main

    buffer = io.StringIO()
    old = os.environ.get("LOOM_DATA_DIR")
    os.environ["LOOM_DATA_DIR"] = str(data_dir)
    try:
        with contextlib.redirect_stdout(buffer):
            main(list(argv))
    finally:
        if old is None:
            os.environ.pop("LOOM_DATA_DIR")
        else:
            os.environ["LOOM_DATA_DIR"] = old
    return buffer.getvalue()


def create_key(data_dir: Path, owner: str) -> str:
    """A new API key of tenant `owner`, made with the real CLI against the database in `data_dir`."""
    return loom_cli(data_dir, "keys", "create", "--owner", owner).split()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoomServer:
    data_dir: Path
    port: int
    process: subprocess.Popen | None = None
    env_extra: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return (self.data_dir / "api_key").read_text().strip()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def access_log_path(self) -> Path:
        """The server's JSON access and error lines (`LOOM_ACCESS_LOG`); its stderr, in `log_path`, has them too."""
        return self.data_dir / "access.log"

    def start(self, timeout: float = 180.0) -> LoomServer:
        env = {
            **os.environ,
            "LOOM_DATA_DIR": str(self.data_dir),
            "LOOM_ACCESS_LOG": str(self.access_log_path),
            **(self.env_extra or {}),
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"loom serve exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"loom serve did not come up:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
