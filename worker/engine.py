"""Execute one tick's worth of leased jobs for a base model: the heart of a worker.

Given the jobs a consumer claimed (each training run's ready chain in seq order, plus sampling requests), the
engine interleaves runs so that work batches: it first applies every run's leading non-forward ops in order
(create, load, optim_step, save, unload), then gathers the leading `forward_backward`/`forward` requests of
*all* runs into ONE mixed-adapter pass, and repeats until every chain is consumed. A run's own ops therefore
execute strictly in seq order while different tenants share passes. Each op is dispatched on its typed payload
(`contract/jobs.py`). Sample jobs go to the sampling backend (`SamplingEngine`, or with `sampler_backend="vllm"`
a vLLM server through `VllmSamplingEngine`); each call advances it by one time slice, and `busy` tells the
consumer to call again.

Every request gets its own `Outcome`: a typed result, or an error with a category (`user` for bad input or a
missing run/checkpoint, `server` for anything unexpected, an unreadable payload included). One tenant's bad
request never fails another's: a mixed pass that fails is rerun to find the offending requests, which fail
alone while the others complete as in a clean pass without them (`worker/fault_isolation.py`); a decode row
whose logits diverge or whose token choice fails fails its own request only (`worker/sampler.py`); an
`optim_step` that would make a run's weights non-finite is refused and leaves the run as it was
(`worker/optimizer.py`). Training passes run in micro-batches of at most `train_token_budget` tokens,
which bounds a worker's peak memory whatever the mix of requests (`worker/trainer.py`).

Each resident run remembers the seq_id of the newest op applied to it (`applied_seq`). Before executing a
run's chain the consumer checks `needs_restore`; a run that is absent (worker restarted, run moved here) or
stale (an op was applied but its result was never recorded) is rebuilt with `restore` from the database's
op log (see `worker/run_recovery.py`), so every acknowledged op takes effect exactly once. With `recovery_every`,
every that-many optimizer steps of a run also write a hidden recovery checkpoint, which bounds that replay.

A failure of the batched forward of a decode step or prefill reruns each job of that batch alone to find the
offender (`worker/sampling_engine.py`).

Limits: a request that fails a mixed pass or a decode batch costs one extra pass (or one solo decode) per
request it shared them with, to find it; a streaming OpenAI job that had already sent tokens when its decode
batch failed fails too (it cannot be restarted unseen).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path

from api.db.checkpoints import CheckpointRecord, storage_key
from api.db.models import CheckpointKind
from contract.age_encryption import encrypt_folder
from contract.checkpoint_store import CheckpointCorrupt, CheckpointExists, CheckpointStore
from contract.jobs import (
    CheckpointTarget,
    ClaimedJob,
    CreateModelJob,
    ForwardBackwardJob,
    JobKind,
    JobResult,
    LoadWeightsJob,
    OptimStepJob,
    SampleJob,
    SaveWeightsExternalJob,
    SaveWeightsForSamplerJob,
    SaveWeightsJob,
    UnloadModelJob,
    UnreadablePayload,
)
from contract.settings import DEFAULT_TOKEN_BUDGET, DEFAULT_TRAIN_TOKEN_BUDGET
from loom.types import (
    CreateModelResponse,
    LoadWeightsResponse,
    OptimStepResponse,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    UnloadModelResponse,
)
from worker.adapter_pool import AdapterPool, ResidentRun, RunNotResident, frozen_copy
from worker.checkpoint_io import CheckpointFormatError, save_adapter, save_optimizer
from worker.fault_isolation import ItemFailure, isolated_forward_backward
from worker.job_payloads import UserInputError, forward_backward_result, work_item
from worker.lora.adapter import LoraSpec
from worker.models.loader import LoadedModel
from worker.optimizer import NonFiniteUpdate
from worker.outcomes import Outcome
from worker.run_recovery import RestorePlan, UnusableCheckpoint, recovery_checkpoint_id
from worker.sampler import NonFiniteLogits
from worker.sampling_backend import SamplingBackend
from worker.sampling_engine import SamplingEngine, StreamSink
from worker.trainer import ItemResult, WorkItem, run_forward_backward

log = logging.getLogger(__name__)

USER_ERRORS = (
    UserInputError,
    RunNotResident,
    CheckpointExists,
    CheckpointCorrupt,
    CheckpointFormatError,
    NonFiniteUpdate,
    NonFiniteLogits,
)


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        store: CheckpointStore,
        sampling: SamplingBackend | None = None,
        *,
        on_stream: StreamSink | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        train_token_budget: int = DEFAULT_TRAIN_TOKEN_BUDGET,
        recovery_every: int = 0,
    ) -> None:
        """`sampling`: the sampling backend (default: Loom's own `SamplingEngine` over this engine's adapter pool,
        with a KV budget of `token_budget` tokens, streaming to `on_stream`). `train_token_budget`: tokens
        of one training micro-batch (`worker/trainer.py`). `recovery_every`: save a hidden recovery checkpoint
        of a run every that many optimizer steps (0: never), so rebuilding it elsewhere replays at most that
        many steps (worker/run_recovery.py)."""
        self.lm = lm
        self.store = store
        self.train_token_budget = train_token_budget
        self.recovery_every = recovery_every
        self.pool = AdapterPool(lm)
        self.sampling: SamplingBackend = sampling or SamplingEngine(lm, self.pool, store, on_stream, token_budget)

    # -- scheduling ----------------------------------------------------------------------------------------

    def execute(self, jobs: Sequence[ClaimedJob]) -> list[Outcome]:
        chains: dict[str, deque[ClaimedJob]] = {}
        samples: list[ClaimedJob] = []
        for job in jobs:
            if job.kind is JobKind.SAMPLE:
                samples.append(job)
            else:  # a training op: the job store gives every one its run and its place in the run's order
                chains.setdefault(job.model_id, deque()).append(job)
        for model_id, chain in chains.items():
            chains[model_id] = deque(sorted(chain, key=attrgetter("seq_id")))
        outcomes: list[Outcome] = []
        while any(chains.values()):
            for chain in chains.values():
                while chain and not isinstance(chain[0].payload, ForwardBackwardJob):
                    job = chain.popleft()
                    outcomes.append(self._guarded(job))
                    self._applied(job)
            batch: list[ClaimedJob] = []
            for chain in chains.values():
                while chain and isinstance(chain[0].payload, ForwardBackwardJob):
                    batch.append(chain.popleft())
            if batch:
                outcomes.extend(self._forward_backward(batch))
                for job in batch:
                    self._applied(job)
        outcomes.extend(self._sample(samples))
        return outcomes

    def _guarded(self, job: ClaimedJob) -> Outcome:
        try:
            return self._apply(job)
        except USER_ERRORS as exc:
            return Outcome.user_error(job, exc)
        except Exception as exc:  # a bug or resource failure must not take the worker down
            log.exception("%s %s failed", job.kind, job.id)
            if job.model_id is not None:  # the run's state may be half-changed: rebuild it from the log
                self.pool.drop_run(job.model_id)
            return Outcome.server_error(job, exc)

    def _apply(self, job: ClaimedJob) -> Outcome:
        """Run one training op other than a forward pass."""
        match job.payload:
            case CreateModelJob(lora=lora):
                self.pool.create_run(job.model_id, LoraSpec(**lora.model_dump()))
                return Outcome(job, CreateModelResponse(model_id=job.model_id))
            case LoadWeightsJob() as load:
                self._load(job.model_id, load)
                return Outcome(job, LoadWeightsResponse(path=load.tinker_path, model_id=job.model_id))
            case OptimStepJob() as step:
                return self._optim_step(job, step)
            case SaveWeightsJob(target=target):
                run = self.pool.run(job.model_id)
                record = self._store_checkpoint(job, CheckpointKind.TRAINING, target, self._training_files(run))
                return Outcome(job, SaveWeightsResponse(path=record.tinker_path), checkpoint=record)
            case SaveWeightsForSamplerJob(target=target, sampling_session_id=session_id):
                run = self.pool.run(job.model_id)
                record = self._store_checkpoint(job, CheckpointKind.SAMPLER, target, self._sampler_files(run))
                self.pool.put_sampler(record.storage_uri, frozen_copy(run.adapter))
                result = SaveWeightsForSamplerResponse(path=record.tinker_path, sampling_session_id=session_id)
                return Outcome(job, result, checkpoint=record)
            case SaveWeightsExternalJob(target=target, age_recipients=recipients):
                run = self.pool.run(job.model_id)
                record = self._store_checkpoint(
                    job, CheckpointKind.EXTERNAL, target, self._external_files(run, recipients)
                )
                result = SaveWeightsExternalResponse(path=record.tinker_path, size_bytes=record.size_bytes)
                return Outcome(job, result, checkpoint=record)
            case UnloadModelJob():
                self.pool.drop_run(job.model_id)
                return Outcome(job, UnloadModelResponse(model_id=job.model_id))
            case UnreadablePayload(error=error):
                return Outcome.server_error(job, ValueError(error))
            case _:
                return Outcome.user_error(job, f"this worker cannot execute {job.kind} requests here")

    def _applied(self, job: ClaimedJob) -> None:
        run = self.pool.runs.get(job.model_id)
        if run is not None:
            run.applied_seq = job.seq_id

    # -- recovery ------------------------------------------------------------------------------------------

    def needs_restore(self, first: ClaimedJob) -> bool:
        """Whether `first`, the head of a run's chain, would run on absent or stale state."""
        if isinstance(first.payload, CreateModelJob | LoadWeightsJob):
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
            match job.payload:
                case ForwardBackwardJob() as fb:
                    item = work_item(self.pool.run(job.model_id).slot, fb, self.lm.images)
                    run_forward_backward(self.lm, [item], self.train_token_budget)
                case OptimStepJob(adam=adam):
                    self.pool.run(job.model_id).optimizer.step(adam)  # no recovery checkpoint: already covered
                case _:
                    self._apply(job)
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
                items.append(work_item(self.pool.run(job.model_id).slot, job.payload, self.lm.images))
            except (RunNotResident, UserInputError) as exc:
                outcomes.append(Outcome.user_error(job, exc))
                continue
            admitted.append(job)
        if not items:
            return outcomes
        results = isolated_forward_backward(self.lm, items, self.train_token_budget)
        return outcomes + [self._trained(job, result) for job, result in zip(admitted, results)]

    @staticmethod
    def _trained(job: ClaimedJob, result: ItemResult | ItemFailure) -> Outcome:
        if isinstance(result, ItemResult):
            return Outcome(job, forward_backward_result(result))
        if result.own:
            return Outcome.user_error(job, f"this request's loss could not be computed: {result.error}")
        return Outcome.server_error(job, result.error)

    def _load(self, model_id: str, load: LoadWeightsJob) -> None:
        self.pool.load_run(model_id, self.store.open(load.storage_uri), load.with_optimizer)

    def _optim_step(self, job: ClaimedJob, step: OptimStepJob) -> Outcome:
        run = self.pool.run(job.model_id)
        outcome = Outcome(job, OptimStepResponse(metrics=run.optimizer.step(step.adam)))
        if self.recovery_every > 0 and run.optimizer.steps % self.recovery_every == 0:
            checkpoint_id = recovery_checkpoint_id(job.seq_id)
            target = CheckpointTarget(
                checkpoint_id=checkpoint_id,
                tinker_path=f"tinker://{job.model_id}/{checkpoint_id}",
                overwrite=True,
                ephemeral=True,
            )
            try:
                outcome.checkpoint = self._store_checkpoint(
                    job, CheckpointKind.TRAINING, target, self._training_files(run)
                )
            except Exception:  # the step itself took effect; a later recovery checkpoint (or the log) covers it
                log.exception("recovery checkpoint of %s after seq %s failed", job.model_id, job.seq_id)
        return outcome

    def _store_checkpoint(
        self, job: ClaimedJob, kind: CheckpointKind, target: CheckpointTarget, fill: Callable[[Path], None]
    ) -> CheckpointRecord:
        key = storage_key(target.checkpoint_id, job.seq_id, job.fencing_token)
        uri, size = self.store.write(job.owner, job.model_id, key, fill)
        return CheckpointRecord(
            run_id=job.model_id,
            owner=job.owner,
            checkpoint_id=target.checkpoint_id,
            kind=kind,
            tinker_path=target.tinker_path,
            storage_uri=uri,
            size_bytes=size,
            ttl_seconds=target.ttl_seconds,
            ephemeral=target.ephemeral,
            overwrite=target.overwrite,
        )

    def _sampler_files(self, run: ResidentRun) -> Callable[[Path], None]:
        return lambda folder: save_adapter(folder, run.adapter, self.lm.targets, self.lm.spec.name)

    def _external_files(self, run: ResidentRun, age_recipients: list[str] | None) -> Callable[[Path], None]:
        """The run's adapter as a PEFT folder (`adapter_config.json` names the public base model id), encrypted
        file by file when the save names age recipients."""

        def fill(folder: Path) -> None:
            save_adapter(folder, run.adapter, self.lm.targets, self.lm.spec.name)
            if age_recipients:
                encrypt_folder(folder, age_recipients)

        return fill

    def _training_files(self, run: ResidentRun) -> Callable[[Path], None]:
        def fill(folder: Path) -> None:
            save_adapter(folder, run.adapter, self.lm.targets, self.lm.spec.name)
            save_optimizer(folder, run.optimizer)

        return fill

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
            if not isinstance(job.payload, SampleJob):
                outcomes.append(self._guarded(job))  # an unreadable payload: fails this job alone
                continue
            try:
                self.sampling.submit(job, job.payload)
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
    def _sampled(job: ClaimedJob, result: JobResult | Exception) -> Outcome:
        """A finished sample job's outcome (a backend may report a job's own failure as an exception)."""
        if isinstance(result, USER_ERRORS):
            return Outcome.user_error(job, result)
        if isinstance(result, Exception):
            return Outcome.server_error(job, result)
        return Outcome(job, result)

    def close(self) -> None:
        """Release what the sampler holds (the vLLM backend's server process)."""
        self.sampling.close()
