"""Which of Loom's source files one `forward_backward` passes through, from the HTTP request to the compute and back.

    .venv/bin/python scripts/request_path.py [--repo DIR]

Starts `loom serve` (embedded workers, tiny Kimi K2 only, a fresh data dir) from the checkout in `--repo` (default:
this one) with a tracer installed in the server process, creates a session and a LoRA run, and waits until the
run exists. Then it records every Loom source file a Python frame runs in, on any thread, from just before one
JSON `forward_backward` request until its result has been retrieved, and prints them. Framework code (FastAPI,
SQLAlchemy, torch, ...) is not counted; files that only start-up or other requests touch are not either.

Limits: the tracer slows the server several-fold, so this is a structural measurement, not a timing one; it runs
the same HTTP calls against any revision whose `loom serve` speaks the Tinker protocol, so two revisions compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PACKAGES = ("api", "worker", "client", "contract", "gpu_kernels")
SERVER = """
import os, signal, sys, threading
repo, out = sys.argv[1], sys.argv[2]
roots = tuple(os.path.join(repo, p) + os.sep for p in {packages!r})
seen, recording = set(), [False]

def trace(frame, event, arg):
    if recording[0] and frame.f_code.co_filename.startswith(roots):
        seen.add(os.path.relpath(frame.f_code.co_filename, repo))
    return None

def toggle(signum, _frame):
    recording[0] = signum == signal.SIGUSR1
    if signum == signal.SIGUSR2:
        with open(out, "w") as f:
            f.write("\\n".join(sorted(seen)))

signal.signal(signal.SIGUSR1, toggle)
signal.signal(signal.SIGUSR2, toggle)
sys.settrace(trace)
threading.settrace(trace)
sys.argv = ["loom", "serve", "--port", sys.argv[3]]
from api.cli import main
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(client: httpx.Client, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/api/v1/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("loom serve did not come up")


def _result(client: httpx.Client, request_id: str) -> dict:
    while True:
        body = client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if body.get("type") != "try_again":
            return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    repo = parser.parse_args().repo.resolve()
    data, port = Path(tempfile.mkdtemp(prefix="loom-path-")), _free_port()
    out = data / "files.txt"
    env = os.environ | {"LOOM_DATA_DIR": str(data), "LOOM_BASE_MODELS": "tiny-kimi-k2", "PYTHONPATH": str(repo)}
    script = SERVER.format(packages=PACKAGES)
    server = subprocess.Popen(
        [sys.executable, "-c", script, str(repo), str(out), str(port)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in server.stdout:
            if "TINKER_API_KEY=" in line:
                key = line.split("TINKER_API_KEY=")[1].split()[0]
                break
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=300)
        _wait_until_up(client)
        session = client.post("/api/v1/create_session", json={}).json()["session_id"]
        create = {"session_id": session, "model_seq_id": 0, "base_model": "tiny-kimi-k2", "lora_config": {"rank": 4}}
        model_id = _result(client, client.post("/api/v1/create_model", json=create).json()["request_id"])["model_id"]
        targets = {"data": [5, 6, 7], "dtype": "int64", "shape": [3]}
        datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [4, 5, 6]}]}}
        datum["loss_fn_inputs"] = {"target_tokens": targets}
        body = {
            "model_id": model_id,
            "seq_id": 1,
            "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
        }
        server.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        result = _result(client, client.post("/api/v1/forward_backward", json=body).json()["request_id"])
        server.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        files = out.read_text().split()
        print(f"forward_backward: loss {result['metrics']['loss:sum']:.4f}")
        print(json.dumps({"files": len(files), "by_package": _by_package(files)}, indent=1))
        print("\n".join(files))
    finally:
        server.terminate()
        server.wait(30)


def _by_package(files: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in files:
        counts[name.split("/")[0]] = counts.get(name.split("/")[0], 0) + 1
    return counts


if __name__ == "__main__":
    main()
