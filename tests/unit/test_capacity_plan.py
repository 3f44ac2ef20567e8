"""`loom plan` (contract/capacity_plan.py, contract/lora_size.py): adapter sizes against the adapter Loom really
creates, the bundled Qwen3-VL configs against their checkpoints' parameter totals, monotonicity, the Kimi K2
LoRA-vs-full RL GPU ratio, and the CLI's JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers

from api.cli import main
from contract.architectures import architecture_of
from contract.capacity_plan import GPUS, PlanInput, compare_rl, plan
from contract.lora_size import lora_size
from contract.model_size import model_size
from contract.published_models import CONFIG_DIR, published_config
from worker.lora.adapter import LoraSpec, create_adapter
from worker.lora.layers import install_multi_lora
from worker.models.builtin_models import tiny_kimi_k2_config_dict, tiny_qwen3_vl_config_dict
from worker.models.model_folder import transformers_config
from worker.models.registry import LORA_TARGETS

CHECKPOINT_PARAMS = {"qwen3-vl-30b-a3b-instruct": 31_070_754_032, "qwen3-vl-235b-a22b-instruct": 235_670_022_896}
"""Elements summed over each published checkpoint's safetensors (a per-tensor listing of the downloaded weights)."""


def bundled(slug: str) -> dict:
    return json.loads((CONFIG_DIR / f"{slug}.json").read_text())


@pytest.mark.parametrize("slug", list(CHECKPOINT_PARAMS))
def test_bundled_qwen3_vl_configs_size_to_their_checkpoints(slug: str) -> None:
    assert model_size(bundled(slug)).total_params == CHECKPOINT_PARAMS[slug]


@pytest.mark.parametrize("slug", ["kimi-k2-instruct", "qwen3-vl-235b-a22b-instruct", "qwen3-8b"])
def test_the_plan_reports_model_sizes_totals(slug: str) -> None:
    config = bundled(slug)
    p = plan(PlanInput(config, GPUS["h200"], 16), slug)
    assert (p.total_params, p.active_params) == (model_size(config).total_params, model_size(config).active_params)
    assert p.base_bytes == model_size(config).weight_bytes["bfloat16"]


@pytest.mark.parametrize(
    "config",
    [published_config("smollm2-135m-instruct"), tiny_kimi_k2_config_dict(), tiny_qwen3_vl_config_dict(moe=True)],
    ids=["smollm2", "tiny-kimi-k2", "tiny-qwen3-vl-moe"],
)
@pytest.mark.parametrize("vision", [False, True])
def test_lora_count_is_what_loom_creates(config: dict, vision: bool) -> None:
    arch = architecture_of(config, "config.json")
    with torch.device("meta"):
        model = getattr(transformers, arch.model_class)(transformers_config(config))
    _, targets = install_multi_lora(model, LORA_TARGETS[arch.model_class])
    spec = LoraSpec(rank=4, seed=0, train_attn=True, train_mlp=True, train_unembed=True, train_vision=vision)
    created = sum(p.numel() for p in create_adapter(targets, spec).parameters())
    groups = ("attn", "mlp", "experts", "unembed", *(("vision",) if vision else ()))
    assert lora_size(config, groups).params(4) == created


def test_shared_expert_lora_divides_the_expert_part_by_the_expert_count() -> None:
    config = published_config("kimi-k2-instruct")
    per_expert, shared = lora_size(config).params_per_rank, lora_size(config, expert_lora="shared").params_per_rank
    assert per_expert["experts"] == 384 * shared["experts"]
    assert {k: v for k, v in per_expert.items() if k != "experts"} == {
        k: v for k, v in shared.items() if k != "experts"
    }


def test_memory_grows_with_rank_and_tenants_shrink() -> None:
    base = PlanInput(published_config("kimi-k2-instruct"), GPUS["h200"], 16, weight_format="fp8")
    plans = [plan(replace(base, rank=r), "k2") for r in (1, 8, 32, 64)]
    runs = [p.memory.lora_run for p in plans]
    assert runs == sorted(runs) and len(set(runs)) == 4
    tenants = [p.tenants for p in plans]
    assert tenants == sorted(tenants, reverse=True) and tenants[0] > tenants[-1]
    assert all(p.memory.base == plans[0].memory.base for p in plans)


def test_checkpointing_saves_activation_memory() -> None:
    p = plan(PlanInput(published_config("qwen3-32b"), GPUS["h100"], 8), "qwen3-32b")
    assert p.memory.activations_checkpointing < p.memory.activations_no_checkpointing


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_kimi_k2_lora_rl_needs_about_a_tenth_of_the_gpus(fmt: str) -> None:
    rl = compare_rl(PlanInput(published_config("kimi-k2-instruct"), GPUS["h200"], 16, weight_format=fmt))
    assert 0.05 <= rl.ratio <= 0.2, rl
    assert 2 / 3 < rl.flop_ratio < 1


def test_the_ratio_does_not_hold_for_a_small_dense_model() -> None:
    rl = compare_rl(PlanInput(published_config("qwen3-0.6b"), GPUS["h100"], 1))
    assert rl.ratio > 0.2


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", "--model", "kimi-k2-instruct", "--gpu", "h200", "--gpus", "16", "--format", "fp8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 16 and out["rl"]["lora_gpus"] < out["rl"]["full_gpus"]
    assert out["lora_params"] == lora_size(published_config("kimi-k2-instruct")).params(32)


def test_cli_reads_a_config_path_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(CONFIG_DIR / "qwen3-vl-30b-a3b-instruct.json")
    main(["plan", "--model", path, "--gpu", "h100", "--gpus", "8", "--expert-lora", "shared"])
    out = capsys.readouterr().out
    assert "tenants per worker" in out and "where the ratio stops holding" in out
