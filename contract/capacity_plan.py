"""Capacity planning on paper: what one Loom worker (a group of GPUs holding one frozen base) needs per GPU, how long
a training step takes, how many tenants fit, and how many GPUs LoRA RL needs against full-parameter RL.

Everything is computed from a `config.json` (`contract/model_size.py` for the base weights, `contract/lora_size.py`
for the adapter) and the GPU's datasheet figures (`GPUS`); nothing is measured. The assumptions, each one a
parameter or a constant named here:

Memory per GPU (bytes; `usable_fraction` of the GPU's memory is usable, the rest left to the CUDA context, NCCL
buffers and allocator fragmentation):

- base: the frozen weights in the chosen format over the worker's G GPUs: routed experts split by expert parallelism,
  everything else partitioned ZeRO-3 style, one copy shared by training and sampling (Loom's worker);
- per run: the adapter in float32 with its float32 gradient and two Adam moments, 16 bytes a parameter (Loom's
  `worker/optimizer.py`), partitioned over the G GPUs; the run taking the optimizer step also holds a same-size
  undo copy (Loom's non-finite guard), reserved once;
- activations of one pass over the step's tokens, spread evenly (T / G tokens a GPU, no gradient accumulation),
  in bfloat16: with activation checkpointing each layer's input plus one layer's saved tensors (recomputed
  layer by layer); without it every layer's saved tensors (`_saved_widths`: the inputs of the norms, projections and
  activation functions, flash attention's q, k, v and output, top-k copies of a token at each MoE layer); plus
  float32 logits and their gradient;
- KV cache for sampling (optional, `kv_tokens` cached tokens over the worker): GQA keeps k and v per layer; MLA keeps
  its compressed latent (kv_lora_rank + qk_rope_head_dim), as vLLM and SGLang do; bfloat16.

Step time = the largest of (assuming communication overlaps compute perfectly):

- compute: matmul FLOPs / (G * bf16 dense peak * `mfu`). Per token, a frozen-base pass costs 2 FLOPs per active
  matmul parameter forward and 2 more for the input gradient (no weight gradient: 4N, full fine-tuning 6N), LoRA
  adds 6 per active adapter parameter, checkpointing adds one forward; causal attention costs seq_len * heads *
  (qk_dim + v_dim) FLOPs per token and layer forward, twice that backward. Text tokens only (the vision tower and
  the input embedding lookup are left out);
- communication: per GPU, ZeRO-3 gathers of the non-expert weights in every pass (forward, backward, recompute), the
  expert-parallel all-to-all (each token's hidden state to its top-k experts and back, every MoE layer and pass),
  and the gradient reduction (the non-expert LoRA gradients in float32; full fine-tuning: non-expert bf16
  gradients), over NVLink within one node and over the GPU's InfiniBand link across nodes, one direction;
- HBM: reading each GPU's weight share once per pass.

RL GPU counts (`compare_rl`): the fewest GPUs (1, 2, 4, 8, then whole nodes) whose memory holds

- LoRA RL: the base once (chosen format; the sampler uses the same weights) + one run's adapter state + its undo
  copy + activations (checkpointed) + KV;
- full-parameter RL: bfloat16 weights, bfloat16 gradients, float32 master weights and two float32 Adam moments
  (16 bytes a parameter, ZeRO-3 over all GPUs) + the rollout engine's own copy of the weights in the chosen format
  (colocated, nothing offloaded to the CPU) + the same activations and KV.

Limits: a paper model. Real systems add fragmentation, pipeline bubbles, imbalance between experts, CPU offload and
overlap losses that these lines do not see; `mfu` is an assumption (public MoE LoRA runs report 10-35 %), not a
measurement. GPU datasheet figures are peak, dense (no sparsity), per GPU of an 8-GPU HGX/DGX node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from contract.lora_size import ExpertLora, lora_size, moe_layers, routed_experts, text_config
from contract.model_size import WeightFormat, model_size

GB = 10**9
LORA_STATE_BYTES = 16
"""Per adapter parameter: float32 weight, gradient, Adam m and v (Loom keeps adapters in float32)."""
FULL_STATE_BYTES = 16
"""Per parameter of full mixed-precision fine-tuning: bf16 weight and gradient, fp32 master, fp32 Adam m and v."""
ACTIVATION_BYTES = 2
"""bfloat16 activations."""
LOGIT_BYTES = 8
"""Per vocabulary entry and token: float32 logits and their float32 gradient."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    """NVLink bandwidth per GPU, one direction."""
    ib_bytes_per_s: float
    """Inter-node bandwidth per GPU, one direction (one NIC per GPU)."""
    gpus_per_node: int = 8
    note: str = ""


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("a100", 80 * GB, 312e12, 2.039e12, 300e9, 25e9, note="A100 80GB SXM; NVLink 3 600 GB/s; HDR 200 Gb/s"),
        GpuSpec("h100", 80 * GB, 989e12, 3.35e12, 450e9, 50e9, note="H100 SXM 80GB; NVLink 4 900 GB/s; NDR 400 Gb/s"),
        GpuSpec("h200", 141 * GB, 989e12, 4.8e12, 450e9, 50e9, note="H200 SXM 141GB; NVLink 4 900 GB/s; NDR 400 Gb/s"),
        GpuSpec(
            "b200",
            192 * GB,
            2.25e15,
            8e12,
            900e9,
            50e9,
            note="B200 192GB as announced (DGX B200 lists 1,440 GB for 8 GPUs); NVLink 5 1.8 TB/s; 400 Gb/s",
        ),
    )
}
"""NVIDIA datasheet figures (bidirectional NVLink halved to one direction; IB in bytes)."""

FORMATS: dict[str, WeightFormat] = {"bf16": "bfloat16", "fp8": "float8", "int4": "int4"}
"""CLI names of the base weight formats (`contract/model_size.py`: fp8 as Kimi K2 ships, int4 as K2-Thinking)."""


@dataclass(frozen=True)
class PlanInput:
    config: Mapping[str, Any]
    gpu: GpuSpec
    gpus: int
    rank: int = 32
    tokens: int = 32768
    """Tokens of one training step (one clock tick: every tenant's rows together)."""
    seq_len: int = 4096
    """Sequence length, for attention FLOPs."""
    weight_format: str = "bf16"
    expert_lora: ExpertLora = "per-expert"
    checkpointing: bool = True
    kv_tokens: int = 0
    """Tokens of sampling KV cache held across the worker (0: none)."""
    mfu: float = 0.2
    usable_fraction: float = 0.9


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    usable: int
    base: int
    lora_run: int
    """One run's adapter + gradient + Adam state, its share on this GPU."""
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    kv_cache: int
    free: int
    """Usable minus base, activations, KV and one run's undo copy: what tenants' states can fill."""


Bound = Literal["compute", "communication", "hbm"]


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step."""

    compute: float
    communication: float
    hbm: float
    step: float
    bound: Bound
    flops: float


@dataclass(frozen=True)
class RlComparison:
    lora_gpus: int
    full_gpus: int
    ratio: float
    lora_bytes: int
    """Total bytes LoRA RL holds (base + one run's state and undo copy + activations + KV)."""
    full_bytes: int
    flop_ratio: float
    """LoRA / full fine-tuning FLOPs per step: the GPU ratio when both are compute-bound at equal step time."""


@dataclass(frozen=True)
class Plan:
    model: str
    gpu: str
    gpus: int
    rank: int
    tokens: int
    seq_len: int
    weight_format: str
    expert_lora: ExpertLora
    checkpointing: bool
    mfu: float
    total_params: int
    active_params: int
    base_bytes: int
    lora_params: int
    lora_params_by_group: dict[str, int]
    memory: Memory
    step_time: StepTime
    tenants: int
    rl: RlComparison
    limits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Text:
    """The language model's facts the planner needs."""

    layers: int
    hidden: int
    vocab: int
    moe_layers: int
    top_k: int
    attn_flops_width: int
    """heads * (qk_dim + v_dim)."""
    kv_bytes_per_token: int
    saved_widths: int
    """Activation elements one token saves in one layer without checkpointing (averaged over dense and MoE layers)."""
    expert_params: int
    """Routed-expert parameters (the part expert parallelism shards; the rest is ZeRO-3 gathered)."""
    matmul_active_params: int
    """Active parameters a text token multiplies by (active minus the input embedding)."""


def _text(config: Mapping[str, Any]) -> _Text:
    text = text_config(config)
    layers, hidden, heads = text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"]
    experts, moe = routed_experts(text), moe_layers(text)
    top_k = text.get("num_experts_per_tok", 0) if moe else 0
    if "kv_lora_rank" in text:
        nope, rope, v_dim = text["qk_nope_head_dim"], text["qk_rope_head_dim"], text["v_head_dim"]
        q_rank, kv_rank = text["q_lora_rank"] or 0, text["kv_lora_rank"]
        attn_width = heads * (nope + rope + v_dim)
        kv_elems = kv_rank + rope
        attn_saved = hidden + 2 * q_rank + heads * (nope + rope) + 2 * kv_rank + rope + heads * (nope + rope + v_dim)
        attn_saved += heads * v_dim
    else:
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or hidden // heads
        attn_width = 2 * heads * head_dim
        kv_elems = 2 * kv_heads * head_dim
        attn_saved = hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim
    dense_saved = hidden + 3 * text["intermediate_size"]
    moe_saved = 0
    if moe:
        shared = text.get("n_shared_experts", 0) * text["moe_intermediate_size"]
        moe_saved = hidden + top_k * (hidden + 3 * text["moe_intermediate_size"]) + 3 * shared
    saved = 2 * hidden + attn_saved + ((layers - moe) * dense_saved + moe * moe_saved) // layers
    expert_params = moe * experts * 3 * hidden * text["moe_intermediate_size"] if moe else 0
    sizes = model_size({**text, "model_type": _text_model_type(config)})
    return _Text(
        layers=layers,
        hidden=hidden,
        vocab=text["vocab_size"],
        moe_layers=moe,
        top_k=top_k,
        attn_flops_width=attn_width,
        kv_bytes_per_token=layers * kv_elems * ACTIVATION_BYTES,
        saved_widths=saved,
        expert_params=expert_params,
        matmul_active_params=sizes.active_params - text["vocab_size"] * hidden,
    )


def _text_model_type(config: Mapping[str, Any]) -> str:
    """The model_type `contract/model_size.py` sizes the language model alone under."""
    model_type = config["model_type"]
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return "qwen3_moe" if routed_experts(config["text_config"]) else "qwen3"
    return model_type


def _activations(t: _Text, tokens_per_gpu: int, checkpointing: bool) -> int:
    layer = tokens_per_gpu * t.saved_widths * ACTIVATION_BYTES
    logits = tokens_per_gpu * t.vocab * LOGIT_BYTES
    if checkpointing:
        return tokens_per_gpu * t.layers * t.hidden * ACTIVATION_BYTES + layer + logits
    return t.layers * layer + logits


def _step_flops(t: _Text, tokens: int, seq_len: int, lora_active: int | None, checkpointing: bool) -> float:
    """FLOPs of one training step: a frozen-base LoRA pass (`lora_active` adapter parameters a token uses) or,
    with `lora_active` None, full fine-tuning (module docstring)."""
    forward = 2 * t.matmul_active_params + seq_len * t.attn_flops_width * t.layers
    attention = seq_len * t.attn_flops_width * t.layers
    if lora_active is None:
        per_token = 3 * forward + (forward if checkpointing else 0)
    else:
        per_token = 2 * forward + attention + 6 * lora_active + (forward + 2 * lora_active if checkpointing else 0)
    return float(per_token) * tokens


def _bandwidth(gpu: GpuSpec, gpus: int) -> float:
    return gpu.nvlink_bytes_per_s if gpus <= gpu.gpus_per_node else gpu.ib_bytes_per_s


def step_time(p: PlanInput, base_bytes: int, t: _Text, lora_active: int, lora_nonexpert: int) -> StepTime:
    """One LoRA training step's time on the worker (module docstring)."""
    g = p.gpus
    passes = 3 if p.checkpointing else 2
    flops = _step_flops(t, p.tokens, p.seq_len, lora_active, p.checkpointing)
    compute = flops / (g * p.gpu.bf16_flops * p.mfu)
    spread = (g - 1) / g
    bytes_per_param = base_bytes / model_size(p.config).total_params
    nonexpert = (model_size(p.config).total_params - t.expert_params) * bytes_per_param
    tokens_per_gpu = math.ceil(p.tokens / g)
    all_to_all = tokens_per_gpu * t.moe_layers * t.top_k * t.hidden * ACTIVATION_BYTES * 2
    moved = spread * (passes * (nonexpert + all_to_all) + 2 * 4 * lora_nonexpert)
    communication = moved / _bandwidth(p.gpu, g)
    hbm = passes * base_bytes / g / p.gpu.hbm_bytes_per_s
    times: dict[Bound, float] = {"compute": compute, "communication": communication, "hbm": hbm}
    bound = max(times, key=lambda k: times[k])
    return StepTime(compute, communication, hbm, times[bound], bound, flops)


def _node_counts(gpu: GpuSpec, limit: int = 100_000) -> list[int]:
    small = [n for n in (1, 2, 4) if n < gpu.gpus_per_node]
    return small + list(range(gpu.gpus_per_node, limit, gpu.gpus_per_node))


def _fewest_gpus(p: PlanInput, t: _Text, resident: int) -> int:
    """The fewest GPUs whose usable memory holds `resident` bytes (sharded) + activations + KV."""
    usable = p.gpu.memory_bytes * p.usable_fraction
    for n in _node_counts(p.gpu):
        per_gpu = (resident + p.kv_tokens * t.kv_bytes_per_token) / n
        if per_gpu + _activations(t, math.ceil(p.tokens / n), True) <= usable:
            return n
    raise ValueError("no GPU count up to 100,000 holds this model")


def compare_rl(p: PlanInput) -> RlComparison:
    """GPUs for LoRA RL against full-parameter RL on the same GPU type (module docstring)."""
    t = _text(p.config)
    size = model_size(p.config)
    base = size.weight_bytes[FORMATS[p.weight_format]]
    run_state = lora_size(p.config, expert_lora=p.expert_lora).params(p.rank) * LORA_STATE_BYTES
    lora_resident = base + 2 * run_state
    full_resident = FULL_STATE_BYTES * size.total_params + base
    lora_gpus = _fewest_gpus(p, t, lora_resident)
    full_gpus = _fewest_gpus(p, t, full_resident)
    lora = lora_size(p.config, expert_lora=p.expert_lora)
    lora_flops = _step_flops(t, p.tokens, p.seq_len, p.rank * lora.active_params_per_rank, True)
    full_flops = _step_flops(t, p.tokens, p.seq_len, None, True)

    def total(resident: int, n: int) -> int:
        return resident + p.kv_tokens * t.kv_bytes_per_token + n * _activations(t, math.ceil(p.tokens / n), True)

    return RlComparison(
        lora_gpus=lora_gpus,
        full_gpus=full_gpus,
        ratio=lora_gpus / full_gpus,
        lora_bytes=total(lora_resident, lora_gpus),
        full_bytes=total(full_resident, full_gpus),
        flop_ratio=lora_flops / full_flops,
    )


def _limits(p: PlanInput, rl: RlComparison, base: int, per_rank: int) -> list[str]:
    """Where "LoRA RL needs about a tenth of the GPUs" stops holding, computed for this model and cluster."""
    node = p.gpu.gpus_per_node
    expert_note = f" ({p.expert_lora} expert LoRA)" if moe_layers(text_config(p.config)) else ""
    lines = [
        f"compute-bound steps: LoRA costs {rl.flop_ratio:.2f}x full fine-tuning's FLOPs per token, so at equal MFU "
        f"and step time it needs about {rl.flop_ratio:.2f}x the GPUs, not {rl.ratio:.2f}x: the memory ratio holds "
        "only while memory, not throughput, sets the GPU count.",
        f"rank: one run's adapter state (16 B/param) equals the {p.weight_format} base at rank "
        f"{base / (LORA_STATE_BYTES * per_rank):,.0f}{expert_note}; past that each tenant holds more than the "
        "weights themselves.",
    ]
    longer = compare_rl(replace(p, tokens=8 * p.tokens))
    lines.append(
        f"tokens: at {8 * p.tokens:,} tokens per step (8x) the counts are {longer.lora_gpus} vs "
        f"{longer.full_gpus} GPUs (ratio {longer.ratio:.2f}): activations and rollout KV cache are paid by both "
        "and pull the ratio toward 1."
    )
    if rl.full_gpus <= node:
        lines.append(
            f"small model: full-parameter RL already fits in one node ({rl.full_gpus} GPUs), so the ratio is set by "
            "rounding to whole GPUs, not by the 16 B/param of optimizer state."
        )
    return lines


def plan(p: PlanInput, model: str) -> Plan:
    """The whole plan for `p` (module docstring); `model` names the config in the output."""
    t = _text(p.config)
    size = model_size(p.config)
    base = size.weight_bytes[FORMATS[p.weight_format]]
    lora = lora_size(p.config, expert_lora=p.expert_lora)
    lora_params = lora.params(p.rank)
    nonexpert_lora = lora_params - (
        p.rank * lora.params_per_rank.get("experts", 0) if p.expert_lora == "per-expert" else 0
    )
    g = p.gpus
    tokens_per_gpu = math.ceil(p.tokens / g)
    run = math.ceil(lora_params * LORA_STATE_BYTES / g)
    with_ckpt, without = _activations(t, tokens_per_gpu, True), _activations(t, tokens_per_gpu, False)
    activations = with_ckpt if p.checkpointing else without
    usable = int(p.gpu.memory_bytes * p.usable_fraction)
    kv = math.ceil(p.kv_tokens * t.kv_bytes_per_token / g)
    free = usable - math.ceil(base / g) - activations - kv - run
    memory = Memory(usable, math.ceil(base / g), run, activations, without, with_ckpt, kv, free)
    rl = compare_rl(p)
    return Plan(
        model=model,
        gpu=p.gpu.name,
        gpus=g,
        rank=p.rank,
        tokens=p.tokens,
        seq_len=p.seq_len,
        weight_format=p.weight_format,
        expert_lora=p.expert_lora,
        checkpointing=p.checkpointing,
        mfu=p.mfu,
        total_params=size.total_params,
        active_params=size.active_params,
        base_bytes=base,
        lora_params=lora_params,
        lora_params_by_group={k: p.rank * v for k, v in lora.params_per_rank.items()},
        memory=memory,
        step_time=step_time(p, base, t, p.rank * lora.active_params_per_rank, nonexpert_lora),
        tenants=max(0, free // run) if run else 0,
        rl=rl,
        limits=_limits(p, rl, base, sum(lora.params_per_rank.values())),
    )
