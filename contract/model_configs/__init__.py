"""Published `config.json` files, kept as data (nothing to import).

Most are the ones `contract/published_models.py` lists. The two Qwen3-VL MoE configs are here for `loom plan`
(`contract/capacity_plan.py`) only, since their stated "A3B"/"A22B" counts leave out the vision tower:

- `qwen3-vl-30b-a3b-instruct.json`: https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Instruct/blob/main/config.json,
  copied from a verbatim dump of that file (transformers_version 4.57.0.dev0).
- `qwen3-vl-235b-a22b-instruct.json`: https://huggingface.co/Qwen/Qwen3-VL-235B-A22B-Instruct/blob/main/config.json;
  only a transformers-5 re-serialisation of it was at hand, so its values are written back in the 30B file's layout
  (`num_experts`, `rope_scaling` + `rope_theta`; the six values that differ: hidden 4096, intermediate 12288,
  moe_intermediate 1536, 64 heads, 94 layers, vision out_hidden_size 4096). Both files size to their checkpoints'
  counted elements exactly (31,070,754,032 and 235,670,022,896; `tests/unit/test_capacity_plan.py`).
"""
