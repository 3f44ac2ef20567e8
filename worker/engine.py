"""Execute one tick's worth of leased jobs for a base model: the heart of a worker.

Given the jobs a consumer claimed (each training run's ready chain in seq order, plus sampling requests), the
engine interleaves runs so that work batches: it first applies every run's leading non-forward ops in order
(create, load, optim_step, save, unload), then gathers the leading `forward_backward`/`forward` requests of
*all* runs into ONE mixed-adapter pass, and repeats until every chain is consumed. A run's own ops therefore
execute strictly in seq order while different tenants share passes. Sample jobs join the continuous decode
batch of `SamplingEngine` (or, with `sampler_backend="vllm"`, go to a vLLM server through `VllmSamplingEngine`);
each call advances it by one time slice, and `busy` tells the consumer to call again.

Every request gets its own `Outcome`: a wire-JSON result, or an error with a category (`user` for bad input
or a missing run/checkpoint, `server` for anything unexpected). One tenant's bad request never fails another's.

Each resident run remembers the seq_id of the newest op applied to it (`applied_seq`). Before executing a
run's chain the consumer checks `needs_restore`; a run that is absent (worker restarted, run moved here) or
stale (an op was applied but its result was never recorded) is rebuilt with `restore` from the database's
op log (see `worker/run_recovery.py`), so every acknowledged op takes effect exactly once. With `recovery_every`,
every that-many optimizer steps of a run also write a hidden recovery checkpoint, which bounds that replay.

Limits: a failure inside a mixed pass (after per-request validation) fails every request of that pass as a
server error and drops the affected runs' state (rebuilt from the log on their next op); a failure inside a
decode step fails the jobs then in the decode batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from api.db.jobs import ClaimedJob
from api.db.models import JobKind
from worker.adapter_pool import AdapterPool, ResidentRun, RunNotResident, frozen_copy
from worker.checkpoint_io import CheckpointFormatError, save_adapter, save_optimizer
from worker.checkpoint_store import CheckpointCorrupt, CheckpointExists, CheckpointStore
from worker.job_payloads import (
    UserInputError,
    adam_step,
    forward_backward_result,
    train_data,
)
from worker.lora.adapter import LoraSpec
from worker.models.loader import LoadedModel
from worker.outcomes import CheckpointRecord, Outcome
from worker.run_recovery import STARTS, RestorePlan, UnusableCheckpoint, recovery_checkpoint_id
from worker.sampling_backend import SamplingBackend
from worker.sampling_engine import SamplingEngine, StreamSink
from worker.trainer import WorkItem, run_forward_backward

log = logging.getLogger(__name__)

FORWARD_KINDS = frozenset({JobKind.FORWARD_BACKWARD.value, JobKind.FORWARD.value})
USER_ERRORS = (UserInputError, RunNotResident, CheckpointExists, CheckpointCorrupt, CheckpointFormatError)


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        store: CheckpointStore,
        on_stream: StreamSink | None = None,
        token_budget: int = 1 << 18,
        sampler_backend: str = "loom",
        recovery_every: int = 0,
    ) -> None:
        """`recovery_every`: save a hidden recovery checkpoint of a run every that many optimizer steps (0: never),
        so rebuilding it elsewhere replays at most that many steps (worker/run_recovery.py)."""
        self.lm = lm
        self.store = store
        self.recovery_every = recovery_every
        self.pool = AdapterPool(lm)
        self.sampling: SamplingBackend
        if sampler_backend == "vllm":
            from worker.vllm.engine import VllmSamplingEngine  # starts a vLLM server for this model
            from worker.vllm.server import DEFAULT_VENV

            self.sampling = VllmSamplingEngine(lm, store, on_stream, venv=DEFAULT_VENV)
        elif sampler_backend == "loom":
            self.sampling = SamplingEngine(lm, self.pool, store, on_stream, token_budget)
        else:
            raise ValueError(f"sampler backend must be 'loom' or 'vllm', not {sampler_backend!r}")
        self._ops: dict[str, Callable[[ClaimedJob], Outcome]] = {
            JobKind.CREATE_MODEL.value: self._create_model,
            JobKind.LOAD_WEIGHTS.value: self._load_weights,
            JobKind.OPTIM_STEP.value: self._optim_step,
            JobKind.SAVE_WEIGHTS.value: self._save_weights,
            JobKind.SAVE_WEIGHTS_FOR_SAMPLER.value: self._save_for_sampler,
            JobKind.UNLOAD_MODEL.value: self._unload,
        }

    @property
    def vocab_size(self) -> int:
        return self.lm.spec.vocab_size

    @property
    def max_length(self) -> int:
        return self.lm.spec.max_context_length

    # -- scheduling ----------------------------------------------------------------------------------------

    def execute(self, jobs: Sequence[ClaimedJob]) -> list[Outcome]:
        chains: dict[str, deque[ClaimedJob]] = {}
        samples: list[ClaimedJob] = []
        loose: list[ClaimedJob] = []
        for job in jobs:
            if job.kind == JobKind.SAMPLE.value:
                samples.append(job)
            elif job.model_id is not None and job.seq_id is not None:
                chains.setdefault(job.model_id, deque()).append(job)
            else:
                loose.append(job)
        outcomes = [self._guarded(self._ops.get(job.kind), job) for job in loose]
        for chain in chains.values():
            chain_sorted = sorted(chain, key=lambda j: j.seq_id)
            chain.clear()
            chain.extend(chain_sorted)
        while any(chains.values()):
            for chain in chains.values():
                while chain and chain[0].kind not in FORWARD_KINDS:
                    job = chain.popleft()
                    outcomes.append(self._guarded(self._ops.get(job.kind), job))
                    self._applied(job)
            batch: list[ClaimedJob] = []
            for chain in chains.values():
                while chain and chain[0].kind in FORWARD_KINDS:
                    batch.append(chain.popleft())
            if batch:
                outcomes.extend(self._forward_backward(batch))
                for job in batch:
                    self._applied(job)
        outcomes.extend(self._sample(samples))
        return outcomes

    def run_to_completion(self, jobs: Sequence[ClaimedJob]) -> list[Outcome]:
        """`execute`, then keep advancing until no sample is in flight (batch callers and tests)."""
        outcomes = self.execute(jobs)
        while self.busy:
            outcomes += self.execute([])
        return outcomes

    def _guarded(self, op: Callable[[ClaimedJob], Outcome] | None, job: ClaimedJob) -> Outcome:
        if op is None:
            return Outcome.user_error(job, ValueError(f"this worker cannot execute {job.kind!r} requests"))
        try:
            return op(job)
        except USER_ERRORS as exc:
            return Outcome.user_error(job, exc)
        except Exception as exc:  # a bug or resource failure must not take the worker down
            log.exception("%s %s failed", job.kind, job.id)
            if job.model_id is not None:  # the run's state may be half-changed: rebuild it from the log
                self.pool.drop_run(job.model_id)
            return Outcome.server_error(job, exc)

    def _applied(self, job: ClaimedJob) -> None:
        run = self.pool.runs.get(job.model_id)
        if run is not None:
            run.applied_seq = job.seq_id

    # -- recovery ------------------------------------------------------------------------------------------

    def needs_restore(self, first: ClaimedJob) -> bool:
        """Whether `first`, the head of a run's chain, would run on absent or stale state."""
        if first.kind in STARTS:
            return False  # it replaces the state wholesale
        run = self.pool.runs.get(first.model_id)
        return run is None or run.applied_seq != first.seq_id - 1

    def restore(self, plan: RestorePlan) -> None:
        """Rebuild a run from a checkpoint and/or by re-applying done ops (results discarded). Raises
        `UnusableCheckpoint` when the plan's starting checkpoint fails verification."""
        self.pool.drop_run(plan.model_id)
        if plan.checkpoint_uri is not None:
            try:
                self.pool.load_run(plan.model_id, self.store.open(plan.checkpoint_uri), with_optimizer=True)
            except (CheckpointCorrupt, CheckpointFormatError) as exc:
                raise UnusableCheckpoint(plan.checkpoint_uri, exc) from exc
        for job in plan.ops:
            if job.kind in FORWARD_KINDS:
                run = self.pool.run(job.model_id)
                data, loss_fn, config = train_data(job.payload, self.vocab_size, self.max_length)
                run_forward_backward(self.lm, [WorkItem(run.slot, data, loss_fn, config, False)])
            elif job.kind == JobKind.OPTIM_STEP.value:
                self._step(job)  # no recovery checkpoint: the state being rebuilt is already covered
            else:
                self._ops[job.kind](job)
        self.pool.run(plan.model_id).applied_seq = plan.last_seq

    def drop_run(self, model_id: str) -> bool:
        """Forget a run's state here (it is rebuilt from the database if it comes back)."""
        return self.pool.drop_run(model_id)

    # -- training ops --------------------------------------------------------------------------------------

    def _forward_backward(self, jobs: list[ClaimedJob]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        items: list[WorkItem] = []
        admitted: list[ClaimedJob] = []
        for job in jobs:
            try:
                run = self.pool.run(job.model_id)
                data, loss_fn, config = train_data(job.payload, self.vocab_size, self.max_length)
            except USER_ERRORS as exc:
                outcomes.append(Outcome.user_error(job, exc))
                continue
            forward_only = job.kind == JobKind.FORWARD.value or bool(job.payload.get("forward_only"))
            items.append(WorkItem(run.slot, data, loss_fn, config, forward_only))
            admitted.append(job)
        if not items:
            return outcomes
        try:
            results = run_forward_backward(self.lm, items)
        except Exception as exc:
            log.exception("mixed forward/backward over %d requests failed", len(items))
            for job in admitted:  # gradients may be half-accumulated: rebuild these runs from the log
                self.pool.drop_run(job.model_id)
            return outcomes + [Outcome.server_error(job, exc) for job in admitted]
        return outcomes + [Outcome(job, result=forward_backward_result(r)) for job, r in zip(admitted, results)]

    def _create_model(self, job: ClaimedJob) -> Outcome:
        if "resolved" in job.payload:  # created from a checkpoint (Tinker's create-via-load_weights form)
            return self._load_weights(job)
        lora = job.payload.get("lora_config") or {}
        seed = lora.get("seed")
        if seed is None:  # derive it from the run, so a restore by replay recreates the same initial factors
            seed = int.from_bytes(hashlib.sha256(job.model_id.encode()).digest()[:4], "big")
        spec = LoraSpec(
            rank=int(lora.get("rank", 32)),
            seed=seed,
            train_attn=bool(lora.get("train_attn", True)),
            train_mlp=bool(lora.get("train_mlp", True)),
            train_unembed=bool(lora.get("train_unembed", True)),
        )
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise UserInputError("lora_config trains nothing: enable at least one of train_attn/mlp/unembed")
        self.pool.create_run(job.model_id, spec)
        return Outcome(job, result={"model_id": job.model_id, "type": "create_model"})

    def _load_weights(self, job: ClaimedJob) -> Outcome:
        folder = self.store.open(job.payload["resolved"]["storage_uri"])
        with_optimizer = bool(job.payload.get("optimizer"))
        self.pool.load_run(job.model_id, folder, with_optimizer)
        return Outcome(job, result={"path": job.payload["path"], "model_id": job.model_id, "type": "load_weights"})

    def _step(self, job: ClaimedJob) -> tuple[ResidentRun, dict[str, float]]:
        run = self.pool.run(job.model_id)
        return run, run.optimizer.step(adam_step(job.payload))

    def _optim_step(self, job: ClaimedJob) -> Outcome:
        run, metrics = self._step(job)
        outcome = Outcome(job, result={"metrics": metrics, "type": "optim_step"})
        if self.recovery_every > 0 and run.optimizer.steps % self.recovery_every == 0:
            try:
                outcome.checkpoint = self._write_recovery_checkpoint(job, run)
            except Exception:  # the step itself took effect; a later recovery checkpoint (or the log) covers it
                log.exception("recovery checkpoint of %s after seq %s failed", job.model_id, job.seq_id)
        return outcome

    def _write_recovery_checkpoint(self, job: ClaimedJob, run: ResidentRun) -> CheckpointRecord:
        checkpoint_id = recovery_checkpoint_id(job.seq_id)
        return self._store_checkpoint(
            job,
            "training",
            lambda folder: self._fill_training(folder, run),
            checkpoint_id=checkpoint_id,
            tinker_path=f"tinker://{job.model_id}/{checkpoint_id}",
            overwrite=True,
            ttl_seconds=None,
            ephemeral=True,
        )

    def _write_checkpoint(self, job: ClaimedJob, kind: str, fill: Callable[[Path], None]) -> CheckpointRecord:
        """A checkpoint the user named (`save_weights*`): where and how come from the API's resolved payload."""
        resolved = job.payload["resolved"]
        return self._store_checkpoint(
            job,
            kind,
            fill,
            checkpoint_id=resolved["checkpoint_id"],
            tinker_path=resolved["tinker_path"],
            overwrite=bool(job.payload.get("overwrite")),
            ttl_seconds=job.payload.get("ttl_seconds"),
            ephemeral=bool(resolved.get("ephemeral")),
        )

    def _store_checkpoint(
        self,
        job: ClaimedJob,
        kind: str,
        fill: Callable[[Path], None],
        *,
        checkpoint_id: str,
        tinker_path: str,
        overwrite: bool,
        ttl_seconds: int | None,
        ephemeral: bool,
    ) -> CheckpointRecord:
        uri, size = self.store.write(job.owner, job.model_id, checkpoint_id, fill, overwrite=overwrite)
        return CheckpointRecord(
            run_id=job.model_id,
            owner=job.owner,
            checkpoint_id=checkpoint_id,
            kind=kind,
            tinker_path=tinker_path,
            storage_uri=uri,
            size_bytes=size,
            ttl_seconds=ttl_seconds,
            ephemeral=ephemeral,
        )

    def _fill_training(self, folder: Path, run: ResidentRun) -> None:
        save_adapter(folder, run.adapter, self.lm.targets, self.lm.spec.name)
        save_optimizer(folder, run.optimizer)

    def _save_weights(self, job: ClaimedJob) -> Outcome:
        run = self.pool.run(job.model_id)
        record = self._write_checkpoint(job, "training", lambda folder: self._fill_training(folder, run))
        return Outcome(job, result={"path": record.tinker_path, "type": "save_weights"}, checkpoint=record)

    def _save_for_sampler(self, job: ClaimedJob) -> Outcome:
        run = self.pool.run(job.model_id)
        record = self._write_checkpoint(
            job, "sampler", lambda folder: save_adapter(folder, run.adapter, self.lm.targets, self.lm.spec.name)
        )
        self.pool.put_sampler(record.storage_uri, frozen_copy(run.adapter))
        session_id = job.payload["resolved"].get("sampling_session_id")
        result = {"path": record.tinker_path, "type": "save_weights_for_sampler"}
        if session_id is not None:
            result["sampling_session_id"] = session_id
        return Outcome(job, result=result, checkpoint=record)

    def _unload(self, job: ClaimedJob) -> Outcome:
        self.pool.drop_run(job.model_id)
        return Outcome(job, result={"model_id": job.model_id, "type": "unload_model"})

    # -- sampling ------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Sampling work is in flight: the consumer should call `execute` again without waiting."""
        return self.sampling.busy

    def in_flight(self) -> set[str]:
        """Ids of the sample jobs this engine holds between calls."""
        return self.sampling.in_flight()

    def _sample(self, jobs: list[ClaimedJob]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                self.sampling.submit(job)
            except USER_ERRORS as exc:
                outcomes.append(Outcome.user_error(job, exc))
            except Exception as exc:
                log.exception("sample %s could not be prepared", job.id)
                outcomes.append(Outcome.server_error(job, exc))
        if not self.sampling.busy:
            return outcomes
        try:
            return outcomes + [self._sampled(job, result) for job, result in self.sampling.advance()]
        except Exception as exc:  # the decode batch is in an unknown state: fail its jobs and start afresh
            log.exception("decode step failed")
            failed = self.sampling.reset()
            return outcomes + [Outcome.server_error(job, exc) for job in failed]

    @staticmethod
    def _sampled(job: ClaimedJob, result: dict | Exception) -> Outcome:
        """A finished sample job's outcome (the vLLM engine reports a job's own failure as an exception)."""
        if isinstance(result, USER_ERRORS):
            return Outcome.user_error(job, result)
        if isinstance(result, Exception):
            return Outcome.server_error(job, result)
        return Outcome(job, result=result)

    def close(self) -> None:
        """Release what the sampler holds (the vLLM backend's server process)."""
        self.sampling.close()
