"""Adapter and optimizer state on disk, in PEFT's format so `peft.PeftModel.from_pretrained` loads it.

Files in a checkpoint folder:
- `adapter_model.safetensors` + `adapter_config.json`: the LoRA in PEFT 0.21 layout. Linear targets map to
  `base_model.model.<module>.lora_{A,B}.weight`; fused routed experts use PEFT's nested `ParamWrapper` names
  (`<experts>.base_layer.lora_*` for `gate_up_proj`, `<experts>.lora_*` for `down_proj`) with A stacked as
  (E·r, in) expert-major and B as (out, r·E) rank-major, exactly as `ParamWrapper.get_delta_weight` reads them.
  On MoE families the dense-MLP and shared-expert linears are listed in `target_parameters` as `<leaf>.weight`
  (same tensor keys): PEFT 0.21 rewrites `gate_proj`/`up_proj`/`down_proj` in `target_modules` into the fused
  expert parameters for transformers-v5 MoE models and would silently drop those linears.
- `optimizer.safetensors` + `trainer_state.json` (training checkpoints only): AdamW moments per parameter, the
  per-parameter step counts and the LoRA spec, so `load_state_with_optimizer` resumes bit-for-bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worker.lora.adapter import LORA_ALPHA, LoraAdapter, LoraSpec, TargetWeight
from worker.models.registry import QWEN3_VL_VISION
from worker.optimizer import RunOptimizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


class CheckpointFormatError(ValueError):
    """The folder is not a Loom/PEFT adapter that fits this base model."""


def _peft_keys(target: TargetWeight) -> tuple[str, str]:
    if target.num_experts == 1:
        prefix = f"base_model.model.{target.name}"
    else:
        module, param = target.name.rsplit(".", 1)
        prefix = f"base_model.model.{module}" + (".base_layer" if param == "gate_up_proj" else "")
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def _to_peft(target: TargetWeight, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if target.num_experts == 1:
        return a, b
    e, r, fan_in = a.shape
    return a.reshape(e * r, fan_in), b.permute(1, 2, 0).reshape(b.shape[1], r * e)


def _from_peft(target: TargetWeight, a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if target.num_experts == 1:
        return a, b
    e = target.num_experts
    return a.reshape(e, rank, target.in_features), b.reshape(target.out_features, rank, e).permute(2, 0, 1)


def _trained(targets: list[TargetWeight], spec: LoraSpec) -> list[TargetWeight]:
    return [t for t in targets if spec.wants(t.group)]


def save_adapter(folder: Path, adapter: LoraAdapter, targets: list[TargetWeight], base_model_path: str) -> None:
    by_name = {t.name: t for t in targets}
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in adapter.params.items():
        target = by_name[name]
        key_a, key_b = _peft_keys(target)
        pa, pb = _to_peft(target, a.detach(), b.detach())
        tensors[key_a], tensors[key_b] = pa.contiguous(), pb.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    trained = _trained(targets, adapter.spec)
    is_moe = any(t.num_experts > 1 for t in targets)
    linear = sorted(
        {t.name.rsplit(".", 1)[-1] for t in trained if t.num_experts == 1 and not (is_moe and t.group == "mlp")}
    )
    dense_mlp = sorted(
        {t.name.rsplit(".", 1)[-1] for t in trained if t.num_experts == 1 and is_moe and t.group == "mlp"}
    )
    experts = sorted(
        {t.name.rsplit(".", 1)[-1] for t in trained if t.num_experts > 1}, key=["gate_up_proj", "down_proj"].index
    )
    params = [f"mlp.experts.{p}" for p in experts] + [f"{leaf}.weight" for leaf in dense_mlp]
    config = LoraConfig(
        r=adapter.spec.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=linear,
        target_parameters=params or None,
        base_model_name_or_path=base_model_path,
    )
    config.save_pretrained(str(folder))


def read_lora_spec(folder: Path) -> LoraSpec:
    """The LoRA shape recorded in a checkpoint (trainer_state.json if present, else adapter_config.json)."""
    state_file = folder / TRAINER_STATE
    if state_file.exists():
        return LoraSpec(**json.loads(state_file.read_text())["lora"])
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    modules = set(config.get("target_modules") or [])
    modules |= {
        p.split(".")[-1] if not p.endswith(".weight") else p.split(".")[-2]
        for p in config.get("target_parameters") or []
    }
    return LoraSpec(
        rank=int(config["r"]),
        seed=None,
        train_attn=bool(modules & {"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa"}),
        train_mlp=bool(modules & {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}),
        train_unembed="lm_head" in modules,
        train_vision=bool(modules & set(QWEN3_VL_VISION)),
    )


def load_adapter(
    folder: Path, targets: list[TargetWeight], spec: LoraSpec | None = None, device: torch.device | None = None
) -> LoraAdapter:
    """The adapter saved in `folder`, its factors on `device` (default CPU)."""
    spec = spec or read_lora_spec(folder)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS), device=str(device or "cpu"))
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError is not a ValueError
        raise CheckpointFormatError(f"cannot read {ADAPTER_WEIGHTS}: {exc}") from exc
    adapter = LoraAdapter(spec)
    for target in _trained(targets, spec):
        key_a, key_b = _peft_keys(target)
        if key_a not in tensors or key_b not in tensors:
            raise CheckpointFormatError(f"checkpoint lacks LoRA factors for {target.name}")
        a, b = _from_peft(target, tensors[key_a], tensors[key_b], spec.rank)
        # Contiguous like freshly created factors: a strided view would change matmul summation order, and with
        # it the float rounding, so a reloaded run would drift from the same run kept in memory.
        adapter.params[target.name] = (
            torch.nn.Parameter(a.clone(memory_format=torch.contiguous_format)),
            torch.nn.Parameter(b.clone(memory_format=torch.contiguous_format)),
        )
    return adapter


def save_optimizer(folder: Path, optimizer: RunOptimizer) -> None:
    names = [n for n, _ in optimizer.adapter.named_parameters()]
    params = optimizer.adapter.parameters()
    moments: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for name, p in zip(names, params):
        st = optimizer.optimizer.state.get(p)
        if not st:
            continue
        moments[f"{name}.exp_avg"] = st["exp_avg"].contiguous()
        moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        steps[name] = float(st["step"])
    save_file(moments, str(folder / OPTIMIZER_STATE))
    spec = optimizer.adapter.spec
    state = {
        "steps": optimizer.steps,
        "param_steps": steps,
        "lora": {
            "rank": spec.rank,
            "seed": spec.seed,
            "train_attn": spec.train_attn,
            "train_mlp": spec.train_mlp,
            "train_unembed": spec.train_unembed,
            "train_vision": spec.train_vision,
        },
    }
    (folder / TRAINER_STATE).write_text(json.dumps(state))


def load_optimizer(folder: Path, optimizer: RunOptimizer) -> None:
    if not (folder / OPTIMIZER_STATE).exists():
        raise CheckpointFormatError("checkpoint has no optimizer state (was it saved with save_weights_for_sampler?)")
    moments = load_file(str(folder / OPTIMIZER_STATE))
    state = json.loads((folder / TRAINER_STATE).read_text())
    for name, p in optimizer.adapter.named_parameters():
        if name not in state["param_steps"]:
            continue
        optimizer.optimizer.state[p] = {
            "step": torch.tensor(state["param_steps"][name]),
            "exp_avg": moments[f"{name}.exp_avg"].clone(),
            "exp_avg_sq": moments[f"{name}.exp_avg_sq"].clone(),
        }
    optimizer.steps = int(state["steps"])
