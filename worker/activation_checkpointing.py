"""Activation checkpointing switched on for one training pass of a shared, frozen model.

`activation_checkpointing(model, enabled)` makes every transformers decoder (and vision) layer keep only its input
during the forward pass and recompute its insides in the backward pass (`torch.utils.checkpoint`, non-reentrant),
then puts the model back as it was. Activation memory of a micro-batch drops from every layer's intermediates to one
hidden-state tensor per layer plus one layer's intermediates, for about one more forward pass of compute.

transformers checkpoints a `GradientCheckpointingLayer` only while that layer is in training mode; the worker keeps
its model in eval mode, so only the layer modules themselves are flagged as training here: their children
(attention dropout and the like) stay in eval mode, so results do not change.

Limits: the backward pass must run while the model is still routed to the same adapters (the trainer runs it inside
the route), since recomputation calls the LoRA layers again; not thread-safe (one pass at a time per model, as the
worker drives it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


@contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    before = [(m.training, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    recompute = partial(checkpoint, use_reentrant=False)
    for layer in layers:
        layer.training = True
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = recompute
    try:
        yield
    finally:
        for layer, (training, flagged, func) in zip(layers, before):
            layer.training = training
            layer.gradient_checkpointing = flagged
            if func is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = func
