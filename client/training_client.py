"""TrainingClient: one LoRA training run.

Role: forward/backward, optimizer steps, checkpoints and sampler snapshots of
one model (``model_id`` from ``create_model``).

Ordering: every operation takes its place in line at call time; the SDK
submits a run's requests one at a time in that order and numbers them with
``seq_id`` 1, 2, … as they are sent (a per-client gate on the SDK loop), so the
server can apply them in order. Results are polled concurrently. A request the
server rejects at submit (4xx) does not use up a ``seq_id``; a submit that
fails otherwise (connection/5xx after all retries, when the server may hold
it) makes later operations of this client fail fast, since the server's
sequence would have a gap.

Wire: JSON bodies in the SDK ≤0.24 shapes. ``forward`` is sent to
``/api/v1/forward_backward`` with ``"forward_only": true`` (the SDK ≥0.25
semantics) rather than to the old ``/api/v1/forward``.

Every method returning an :class:`~loom.futures.APIFuture` returns at once;
its ``_async`` twin is a coroutine returning that same future (await the
future again for the result). No client-side chunking of large batches.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Union

from . import errors, types
from .futures import APIFuture, poll_result, submit
from .tokenizers import fetch_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .sampling_client import SamplingClient
    from .service_client import ServiceClient


class _SubmitGate:
    """Submits a run's requests one at a time, in call order, and numbers them.

    Each call takes a *ticket* (0, 1, …) synchronously; submissions pass the
    gate in ticket order and receive the wire ``seq_id`` there (1, 2, …). A
    request the server definitively rejects (HTTP 4xx at submit) gives its
    ``seq_id`` to the next request, so the run's server-side sequence has no
    gap. Any other submit failure (the server may or may not have it) poisons
    the gate. Lives on the SDK loop.
    """

    def __init__(self, first_seq_id: int = 1) -> None:
        self._lock = threading.Lock()
        self._tickets = 0
        self._turn = 0
        self._seq_id = first_seq_id
        self._waiters: dict[int, asyncio.Event] = {}
        self._error: BaseException | None = None

    def take_ticket(self) -> int:
        with self._lock:
            ticket = self._tickets
            self._tickets += 1
            return ticket

    @asynccontextmanager
    async def turn(self, ticket: int) -> AsyncIterator[int]:
        """Wait for ``ticket``'s turn; yields the ``seq_id`` to send."""
        while self._turn < ticket:
            event = self._waiters.setdefault(ticket, asyncio.Event())
            await event.wait()
        try:
            if self._error is not None:
                raise errors.LoomError(
                    "an earlier request of this training client could not be submitted"
                ) from self._error
            try:
                yield self._seq_id
            except errors.APIStatusError as exc:
                if not 400 <= exc.status_code < 500:
                    self._error = exc
                raise
            except BaseException as exc:
                self._error = exc
                raise
            else:
                self._seq_id += 1
        finally:
            self._turn = ticket + 1
            event = self._waiters.pop(self._turn, None)
            if event is not None:
                event.set()


DatumLike = Union[types.Datum, dict[str, Any]]


class TrainingClient:
    """Client of one training run; create it with ``ServiceClient.create_lora_training_client``."""

    def __init__(
        self,
        service: "ServiceClient",
        model_id: str,
        *,
        base_model: str | None = None,
        model_seq_id: int | None = None,
    ) -> None:
        self._service = service
        self._http = service._http
        self.model_id = model_id
        self.base_model = base_model
        self.model_seq_id = model_seq_id
        self._gate = _SubmitGate(first_seq_id=1)
        self._info: types.GetInfoResponse | None = None

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self.base_model!r})"

    # -------------------------------------------------------------- plumbing
    async def _ordered(
        self,
        ticket: int,
        path: str,
        make_body: Callable[[int], dict[str, Any]],
        result_type: Any,
        request_type: str,
    ) -> Any:
        async with self._gate.turn(ticket) as seq_id:
            request_id = await submit(self._http, path, make_body(seq_id))
        return await poll_result(self._http, request_id, result_type, request_type=request_type)

    def _operation(
        self,
        path: str,
        make_body: Callable[[int], dict[str, Any]],
        result_type: Any,
        request_type: str,
    ) -> APIFuture[Any]:
        ticket = self._gate.take_ticket()
        coro = self._ordered(ticket, path, make_body, result_type, request_type)
        return APIFuture(self._http.run(coro), request_type)

    # ---------------------------------------------------- forward / backward
    def _fwd(
        self, data: Sequence[DatumLike], loss_fn: str, loss_fn_config: dict[str, float | str] | None, forward_only: bool
    ) -> APIFuture[types.ForwardBackwardOutput]:
        fb_input = types.ForwardBackwardInput(data=list(data), loss_fn=loss_fn, loss_fn_config=loss_fn_config)  # type: ignore[arg-type]

        def body(seq_id: int) -> dict[str, Any]:
            return types.ForwardBackwardRequest(
                forward_backward_input=fb_input,
                model_id=self.model_id,
                seq_id=seq_id,
                forward_only=True if forward_only else None,
            ).to_wire()

        return self._operation(
            "/api/v1/forward_backward",
            body,
            types.ForwardBackwardOutput,
            "Forward" if forward_only else "ForwardBackward",
        )

    def forward_backward(
        self,
        data: Sequence[DatumLike],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward + backward; gradients accumulate until :meth:`optim_step`."""
        return self._fwd(data, loss_fn, loss_fn_config, forward_only=False)

    async def forward_backward_async(
        self,
        data: Sequence[DatumLike],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    def forward(
        self,
        data: Sequence[DatumLike],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward only: losses and logprobs, no gradients."""
        return self._fwd(data, loss_fn, loss_fn_config, forward_only=True)

    async def forward_async(
        self,
        data: Sequence[DatumLike],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    # -------------------------------------------------------------- optimizer
    def optim_step(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        """Apply one AdamW step with the accumulated gradients."""
        params = types.AdamParams.model_validate(adam_params, from_attributes=True)

        def body(seq_id: int) -> dict[str, Any]:
            return types.OptimStepRequest(adam_params=params, model_id=self.model_id, seq_id=seq_id).to_wire()

        return self._operation("/api/v1/optim_step", body, types.OptimStepResponse, "OptimStep")

    async def optim_step_async(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        return self.optim_step(adam_params)

    # ----------------------------------------------------------- checkpoints
    def save_state(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Save weights + optimizer state as ``tinker://<run>/weights/<name>``."""

        def body(seq_id: int) -> dict[str, Any]:
            return types.SaveWeightsRequest(
                model_id=self.model_id, path=name, seq_id=seq_id, ttl_seconds=ttl_seconds, overwrite=overwrite
            ).to_wire()

        return self._operation("/api/v1/save_weights", body, types.SaveWeightsResponse, "SaveWeights")

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
    ) -> APIFuture[types.SaveWeightsResponse]:
        return self.save_state(name, ttl_seconds, overwrite)

    def _load(self, path: str, optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        def body(seq_id: int) -> dict[str, Any]:
            return types.LoadWeightsRequest(
                model_id=self.model_id, seq_id=seq_id, path=path, optimizer=optimizer
            ).to_wire()

        return self._operation("/api/v1/load_weights", body, types.LoadWeightsResponse, "LoadWeights")

    async def _load_coro(self, path: str, optimizer: bool) -> types.LoadWeightsResponse:
        """Load from inside the SDK loop (used by ``create_training_client_from_state``)."""
        ticket = self._gate.take_ticket()

        def body(seq: int) -> dict[str, Any]:
            return types.LoadWeightsRequest(
                model_id=self.model_id, seq_id=seq, path=path, optimizer=optimizer
            ).to_wire()

        return await self._ordered(ticket, "/api/v1/load_weights", body, types.LoadWeightsResponse, "LoadWeights")

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights from a ``tinker://…/weights/…`` checkpoint; the optimizer resets."""
        return self._load(path, optimizer=False)

    async def load_state_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self.load_state(path)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights and the Adam moments."""
        return self._load(path, optimizer=True)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Save sampler weights as ``tinker://<run>/sampler_weights/<name>``."""

        def body(seq_id: int) -> dict[str, Any]:
            return types.SaveWeightsForSamplerRequest(
                model_id=self.model_id, path=name, seq_id=seq_id, ttl_seconds=ttl_seconds
            ).to_wire()

        return self._operation(
            "/api/v1/save_weights_for_sampler", body, types.SaveWeightsForSamplerResponse, "SaveWeightsForSampler"
        )

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name, ttl_seconds)

    async def _snapshot_sampler(self) -> "SamplingClient":
        from .sampling_client import SamplingClient

        ticket = self._gate.take_ticket()

        def body(seq: int) -> dict[str, Any]:
            return types.SaveWeightsForSamplerRequest(
                model_id=self.model_id,
                seq_id=seq,
                sampling_session_seq_id=self._service._next_sampling_session_seq_id(),
            ).to_wire()

        response: types.SaveWeightsForSamplerResponse = await self._ordered(
            ticket,
            "/api/v1/save_weights_for_sampler",
            body,
            types.SaveWeightsForSamplerResponse,
            "SaveWeightsForSampler",
        )
        if not response.sampling_session_id:
            raise errors.LoomError("server returned no sampling_session_id for an ephemeral sampler save")
        return SamplingClient(self._http, response.sampling_session_id, base_model=self.base_model)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> "SamplingClient":
        """Snapshot the current weights (ephemeral) and return a client sampling them.

        ``name`` is accepted for compatibility and ignored, as in tinker.
        """
        return self._http.call(self._snapshot_sampler())

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> "SamplingClient":
        return await self._http.call_async(self._snapshot_sampler())

    def create_sampling_client(self, model_path: str) -> "SamplingClient":
        """Sampling client for a saved ``tinker://…/sampler_weights/…`` path."""
        return self._service.create_sampling_client(model_path=model_path)

    async def create_sampling_client_async(self, model_path: str) -> "SamplingClient":
        return await self._service.create_sampling_client_async(model_path=model_path)

    # ------------------------------------------------------------------- info
    async def _fetch_info(self) -> types.GetInfoResponse:
        body = await self._http.post_json("/api/v1/get_info", types.GetInfoRequest(model_id=self.model_id).to_wire())
        info = types.GetInfoResponse.model_validate(body)
        if info.model_data.tokenizer_id:
            info.model_data.tokenizer_id = info.model_data.tokenizer_id.split(":")[0]
        self._info = info
        return info

    def get_info(self) -> types.GetInfoResponse:
        """Model metadata (``model_data.tokenizer_id``, ``lora_rank``…)."""
        return self._http.call(self._fetch_info())

    async def get_info_async(self) -> types.GetInfoResponse:
        return await self._http.call_async(self._fetch_info())

    def get_tokenizer(self) -> Any:
        """The server's tokenizer of the base model, downloaded from the server and cached locally
        (:mod:`loom.tokenizers`; needs ``transformers``)."""
        info = self._info or self.get_info()
        name = info.model_data.tokenizer_id or info.model_data.model_name or self.base_model
        if not name:
            raise errors.LoomError("the server reported no tokenizer for this model")
        return load_tokenizer(self._http.call(fetch_tokenizer(self._http, name)))

    def save_weights_external(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """Save the adapter as a downloadable PEFT folder, ``tinker://<run>/external_weights/<name>``
        (``RestClient.download_checkpoint`` fetches it); with age recipients every file is encrypted to them."""

        def body(seq_id: int) -> dict[str, Any]:
            return types.SaveWeightsExternalRequest(
                model_id=self.model_id,
                path=name,
                seq_id=seq_id,
                ttl_seconds=ttl_seconds,
                age_encryption_recipients=age_encryption_recipients,
            ).to_wire()

        return self._operation(
            "/api/v1/save_weights_external", body, types.SaveWeightsExternalResponse, "SaveWeightsExternal"
        )

    async def save_weights_external_async(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        return self.save_weights_external(name, ttl_seconds, age_encryption_recipients)
