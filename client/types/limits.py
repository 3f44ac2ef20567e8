"""The bounds every request must stay inside, independent of the base model: one place for the numbers.

The wire types (`Field` bounds), the request checks in `validation.py` and the API all read these constants, and
the README's "Limits" table is generated from them (`scripts/limits_table.py`), so the documented limit and the
enforced one cannot drift apart. Model-dependent limits (vocabulary, context, tokens a worker can train in one
pass) come from the server: `get_server_capabilities` reports them per base model.

Limits: these are Loom's choices, sized so that no single request can exhaust a worker; a deployment that needs
other values changes them here (and the README table follows).
"""

from __future__ import annotations

INT64_MAX = 2**63 - 1
"""Ids, sequence numbers, seeds and offsets are stored as signed 64-bit integers."""

MAX_SEED = INT64_MAX
"""Seeds (LoRA initialisation, sampling) are in [0, MAX_SEED]."""

MIN_TTL_SECONDS = 3600
"""The shortest checkpoint time-to-live (Tinker's minimum)."""
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
"""The longest checkpoint time-to-live: ten years (omit `ttl_seconds` to keep a checkpoint forever)."""

MAX_LEARNING_RATE = 10.0
"""The largest Adam learning rate accepted; beyond it a single step only destroys an adapter."""

MAX_SAMPLES = 128
"""The most sequences one sample request may ask for."""

MAX_DATUMS = 1024
"""The most datums one forward_backward / forward request may carry."""

MAX_TENSOR_ELEMENTS = 1 << 24
"""The most elements (dense count, so a sparse tensor's full shape) one tensor in a request may describe."""

MAX_TARGET_K = 64
"""The most target tokens per position in a 2-D `target_tokens` (shape (N, K), cross_entropy only)."""

SEQ_ID_WINDOW = 1024
"""How far ahead of a run's newest submitted op a client may number a request (`seq_id`)."""

MAX_PAGE_SIZE = 1000
"""The most items one list request (`limit`) returns."""

MAX_JSON_DEPTH = 32
"""How deeply free-form JSON (user_metadata, telemetry events, OpenAI tools) may nest; deeper cannot be stored."""

CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
"""Checkpoint names: 1-128 of `[A-Za-z0-9._-]`, not starting with a dot (so never `.`, `..` or a hidden file)."""

MAX_AGE_RECIPIENTS = 10
"""The most age recipients one `save_weights_external` may encrypt to (Tinker's limit)."""

MAX_CUSTOM_LOSS_NODES = 512
"""The most nodes a custom loss graph (`create_custom_loss`) may have, placeholders and output included."""

MAX_CUSTOM_LOSS_INPUTS = 16
"""The most inputs a custom loss takes, `logprobs` included (the SDK's own limit)."""
