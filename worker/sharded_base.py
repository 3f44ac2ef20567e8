"""Shard a worker's frozen base model across ranks with DeepSpeed ZeRO stage 3; LoRA stays per run, replicated.

Role: the multi-GPU / multi-node option of issue 4 for a base model too big for one device. Every rank of a
`torch.distributed` group keeps only 1/N of each base parameter (`param.ds_tensor`); DeepSpeed's module hooks
all-gather a module's parameters just before its forward (and again before its backward) and free them after.
The run adapters (`worker.lora.adapter.LoraAdapter`) are plain tensors outside the `nn.Module` tree, so DeepSpeed
never sees them: each rank holds every resident adapter in full. The ranks split memory, not work: every rank
runs the whole batch (`worker/lockstep.py`), so every rank computes the same adapter gradients and, after the same
optimizer step, holds the same adapters, with no gradient all-reduce.

Use (on every rank, same order of calls; `worker/lockstep.py` does this for `loom worker --zero3`):
    init_distributed()                    # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    lm = load_sharded_model(entry, cache)  # the engine's LoadedModel, partitioned while loading
    partition_sizes(lm.model)             # what this rank stores
    ... the same engine calls on every rank, each over the whole batch
  `load_sharded_base(check_model_folder(path), targets)` loads any `save_pretrained` folder that way; `shard_frozen_base(model)`
  partitions a model already materialised in full on each rank.

Limits (measured or read in deepspeed 0.19.8; see tests/integration/test_deepspeed_two_rank.py):
- Every forward is a collective: all ranks must run the same modules in the same order, so the worker's clock
  tick has to be driven in lockstep: `worker/lockstep.py` does that for `loom worker --zero3` (rank 0 takes the
  work and broadcasts it; every rank runs the whole batch, so no rank is ever without rows).
- ZeRO-3 moves the whole model over the interconnect on every forward and again on every backward (params are
  gathered, not the activations). For a trillion-parameter MoE this is terabytes per step and useless for
  token-by-token decoding; it pays off only for large training batches. Expert parallelism (experts stay put,
  tokens move: DeepSpeed's AutoEP has a `deepseek_v3` preset, but it replaces the MoE module, and with it our
  per-run expert LoRA wrapper) or tensor parallelism is the serving answer; neither was tried here.
- `shard_frozen_base` takes a model materialised in full on each rank. `load_sharded_base` instead loads with
  transformers' ZeRO-3 path (`HfDeepSpeedConfig`, i.e. `deepspeed.zero.Init`), so parameters are partitioned as
  they are created. A partitioned parameter's `shape` is (0,) (the real one is `ds_shape`), and
  `install_multi_lora` would then silently skip the fused routed experts (no expert LoRA). `_full_shapes` works
  around that by showing zero-stride views of the real shapes while the wrappers are installed; the clean fix is
  for worker/lora/layers.py to read `getattr(p, "ds_shape", p.shape)`.
- The fused routed-expert tensors are read by `MultiLoraExperts` without calling the experts module's forward.
  They are registered as external parameters of the wrapper, so its pre-forward hook gathers them (without that,
  deepspeed 0.19.8 still gathers them on attribute access, with the same result, one tensor at a time).
- CPU: DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`, gloo). On first use it JIT-compiles its shared-memory
  collective op into TORCH_EXTENSIONS_DIR (about a minute on two cores; scripts/setup-deepspeed does it once).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract.catalogue import BaseModelEntry, LoraTargets
from worker.lora.adapter import TargetWeight
from worker.lora.layers import AdapterRouter, MultiLoraExperts, install_multi_lora
from worker.models.loader import LoadedModel, load_weights, open_model
from worker.models.model_folder import ModelFolder
from worker.models.registry import lora_targets
from worker.models.vision_inputs import encoder_for


def _deepspeed():
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    return deepspeed


def zero3_config(**overrides: Any) -> dict[str, Any]:
    """A ZeRO-3 config that partitions every base parameter (no persistence threshold) and has no optimizer."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            # DeepSpeed keeps parameters under 1e5 elements whole on every rank by default; 0 shards them all.
            "stage3_param_persistence_threshold": 0,
        },
    }
    config.update(overrides)
    return config


def init_distributed(backend: str | None = None) -> None:
    """Join the env:// process group (gloo on CPU, the accelerator's backend elsewhere)."""
    ds = _deepspeed()
    if backend is None:
        backend = ds.get_accelerator().communication_backend_name()
        if backend == "ccl" and ds.get_accelerator().device_name() == "cpu":
            backend = "gloo"
    ds.init_distributed(dist_backend=backend, verbose=False)


@dataclass
class ShardedBase:
    engine: Any
    """The DeepSpeed engine (no optimizer: a `DeepSpeedZeRoOffload`). Call `module`, not `engine(...)`, whose
    backward hook refuses a plain `loss.backward()` without an optimizer."""
    module: nn.Module
    """The same model object that was passed in, now partitioned and hooked."""
    hf_config: Any = None
    """transformers' `HfDeepSpeedConfig` when loaded by `load_sharded_base`; transformers only holds a weak
    reference to it and consults it (e.g. `generate(synced_gpus=...)`), so it lives as long as the model."""


def partition_sizes(model: nn.Module) -> dict[str, int]:
    """Elements of base parameters: `full` in the model, `local` stored on this rank (padded partitions),
    `owned` of those that are real (not padding), `materialised` currently held in gathered form."""
    rank = torch.distributed.get_rank()
    full = local = owned = materialised = 0
    for p in model.parameters():
        if not hasattr(p, "ds_tensor"):
            raise ValueError("parameter is not partitioned by ZeRO-3")
        part = p.ds_tensor.numel()
        full += p.ds_numel
        local += part
        owned += max(0, min(part, p.ds_numel - rank * part))
        materialised += p.data.numel()
    return {"full": full, "local": local, "owned": owned, "materialised": materialised}


def shard_frozen_base(model: nn.Module, config: dict[str, Any] | None = None) -> ShardedBase:
    """Partition the (already LoRA-wrapped, frozen) model's parameters across the process group in place."""
    ds = _deepspeed()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"base model must be frozen; trainable: {trainable[:3]}")
    for module in model.modules():
        if isinstance(module, MultiLoraExperts):
            for name in ("gate_up_proj", "down_proj"):
                ds.zero.register_external_parameter(module, getattr(module.base, name))
    engine, *_ = ds.initialize(model=model, config=config or zero3_config())
    return ShardedBase(engine, engine.module)


@contextmanager
def _full_shapes(model: nn.Module) -> Iterator[None]:
    """Give every partitioned parameter a zero-stride view of its real shape (no memory) for the duration."""
    hidden = [p for p in model.parameters() if hasattr(p, "ds_shape") and p.data.numel() == 0]
    for p in hidden:
        p.data = torch.zeros(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
    try:
        yield
    finally:
        for p in hidden:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def load_sharded_base(
    folder: ModelFolder, lora_targets: LoraTargets, config: dict[str, Any] | None = None
) -> tuple[ShardedBase, AdapterRouter, list[TargetWeight]]:
    """Load a `save_pretrained` folder (checked first) partitioned from the start (float32, sdpa, frozen) and
    install multi-LoRA."""
    _deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    config = config or zero3_config()
    hf_config = HfDeepSpeedConfig(config)
    model = load_weights(folder, torch.float32)
    with _full_shapes(model):
        router, targets = install_multi_lora(model, lora_targets)
    sharded = shard_frozen_base(model, config)
    sharded.hf_config = hf_config
    return sharded, router, targets


def load_sharded_model(entry: BaseModelEntry, model_cache_dir: Path) -> LoadedModel:
    """A registry base model (its cached `save_pretrained` folder) partitioned over the process group, as the
    `LoadedModel` the engine runs; `sharding` keeps the DeepSpeed engine and configs alive with it."""
    folder, tokenizer = open_model(entry, model_cache_dir)
    sharded, router, targets = load_sharded_base(folder, lora_targets(entry))
    images = encoder_for(entry.vision)
    return LoadedModel(entry, folder.path, sharded.module, tokenizer, router, targets, sharding=sharded, images=images)
