"""The adapters resident on one worker: trainable runs (LoRA + AdamW state) and frozen sampler snapshots.

Every resident adapter has a slot id registered in the model's `AdapterRouter`, so a mixed batch can name the
adapter of each row. Training runs are keyed by Tinker model_id; sampler snapshots by the storage URI of the
checkpoint they came from and kept in a small LRU (re-loaded from the checkpoint store when evicted).

Limits: everything lives in this process's memory; a worker restart drops resident runs. The pool itself moves
nothing between workers: a run this worker does not hold (or holds stale), e.g. one whose worker crashed, is
rebuilt here from the database log (`worker/run_recovery.py` plans it, `Engine.restore` applies it).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch

from worker.checkpoint_io import load_adapter, load_optimizer
from worker.lora.adapter import LoraAdapter, LoraSpec, create_adapter
from worker.models.loader import LoadedModel
from worker.optimizer import RunOptimizer


class RunNotResident(LookupError):
    """A training op names a run whose adapter is not on this worker."""


@dataclass
class ResidentRun:
    model_id: str
    slot: int
    adapter: LoraAdapter
    optimizer: RunOptimizer
    applied_seq: int = -1
    """seq_id of the newest op applied to this state; the consumer restores the run when it does not match."""


def frozen_copy(adapter: LoraAdapter) -> LoraAdapter:
    """A detached copy of an adapter's current factors, for sampling while training goes on."""
    copy = LoraAdapter(adapter.spec)
    for name, (a, b) in adapter.params.items():
        copy.params[name] = (
            torch.nn.Parameter(a.detach().clone(), requires_grad=False),
            torch.nn.Parameter(b.detach().clone(), requires_grad=False),
        )
    return copy


class AdapterPool:
    def __init__(self, lm: LoadedModel, max_samplers: int = 64) -> None:
        self.lm = lm
        self.runs: dict[str, ResidentRun] = {}
        self.samplers: OrderedDict[str, int] = OrderedDict()
        self.max_samplers = max_samplers
        self.pinned: Counter[int] = Counter()
        self._slots = count()

    def _register(self, adapter: LoraAdapter) -> int:
        slot = next(self._slots)
        self.lm.router.adapters[slot] = adapter
        return slot

    # -- training runs -------------------------------------------------------------------------------------

    def create_run(self, model_id: str, spec: LoraSpec) -> ResidentRun:
        self.drop_run(model_id)
        adapter = create_adapter(self.lm.targets, spec, self.lm.device)
        run = ResidentRun(model_id, self._register(adapter), adapter, RunOptimizer(adapter))
        self.runs[model_id] = run
        return run

    def load_run(self, model_id: str, folder: Path, with_optimizer: bool, spec: LoraSpec | None = None) -> ResidentRun:
        """Make `model_id` resident with the weights in `folder` (and its Adam moments if asked)."""
        adapter = load_adapter(folder, self.lm.targets, spec, self.lm.device)
        optimizer = RunOptimizer(adapter)
        if with_optimizer:
            load_optimizer(folder, optimizer)
        self.drop_run(model_id)
        run = ResidentRun(model_id, self._register(adapter), adapter, optimizer)
        self.runs[model_id] = run
        return run

    def run(self, model_id: str) -> ResidentRun:
        run = self.runs.get(model_id)
        if run is None:
            raise RunNotResident(
                f"training run {model_id} is not resident on this worker (it was unloaded, or its state could not "
                "be restored); create it again from a saved checkpoint"
            )
        return run

    def drop_run(self, model_id: str) -> bool:
        run = self.runs.pop(model_id, None)
        if run is not None:
            self.lm.router.adapters.pop(run.slot, None)
        return run is not None

    # -- sampler snapshots ---------------------------------------------------------------------------------

    def put_sampler(self, key: str, adapter: LoraAdapter) -> int:
        """Register a frozen snapshot under `key` (a checkpoint's storage URI)."""
        if key in self.samplers:  # re-saved under the same name: rows still decoding keep the old slot
            old = self.samplers.pop(key)
            if not self.pinned[old]:
                self.lm.router.adapters.pop(old, None)
        slot = self._register(adapter)
        self.samplers[key] = slot
        evictable = [k for k, s in self.samplers.items() if not self.pinned[s] and k != key]
        for old_key in evictable[: max(0, len(self.samplers) - self.max_samplers)]:
            self.lm.router.adapters.pop(self.samplers.pop(old_key), None)
        return slot

    def pin(self, slot: int) -> None:
        """Keep a sampler snapshot resident while rows decode with it."""
        self.pinned[slot] += 1

    def unpin(self, slot: int) -> None:
        self.pinned[slot] -= 1
        if self.pinned[slot] <= 0:
            del self.pinned[slot]
            if slot not in self.samplers.values():  # replaced while pinned: free it now
                self.lm.router.adapters.pop(slot, None)

    def sampler_slot(self, key: str, open_folder: Callable[[str], Path]) -> int:
        """Slot of the snapshot stored at `key`, loading it through `open_folder` if it is not resident."""
        slot = self.samplers.get(key)
        if slot is not None:
            self.samplers.move_to_end(key)
            return slot
        adapter = frozen_copy(load_adapter(open_folder(key), self.lm.targets, device=self.lm.device))
        return self.put_sampler(key, adapter)
