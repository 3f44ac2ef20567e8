"""ServiceClient: the SDK's entry point.

Role: holds the connection (:class:`loom.http.HttpClient`) and the session, and
creates training, sampling and REST clients.

- Base URL: ``base_url`` argument, else ``LOOM_BASE_URL``, else
  ``TINKER_BASE_URL``, else ``http://127.0.0.1:8000``.
- API key: ``api_key`` argument, else ``LOOM_API_KEY``, else ``TINKER_API_KEY``;
  sent as ``X-API-Key``.
- Session: ``POST /api/v1/create_session`` on first training/sampling use
  (not for the REST client), then ``session_heartbeat`` every 10 s on the SDK
  loop; heartbeat failures are logged, never raised (a 410 — the session was
  finished — ends the heartbeat). ``close()`` (or leaving a ``with`` block)
  finishes the session (``POST /api/v1/sessions/{id}/finish``, reason
  ``success``, ``errored`` or ``interrupted`` as in tinker): the server then
  takes no new work in it, while its submitted requests still complete.
- Identifiers (as tinker): each training client gets ``model_seq_id`` 0, 1, …
  within the session; ``sampling_session_seq_id`` 0, 1, … is shared by
  ``create_sampling_session`` and ephemeral ``save_weights_for_sampler``.

Creation methods block and return the client; their ``_async`` twins return
the client too (tinker ≥0.38 returns a future of the client instead).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from typing import Any, Literal

import httpx

from . import errors, types
from .futures import submit_and_poll
from .http import HttpClient, RetryPolicy
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .training_client import TrainingClient

logger = logging.getLogger("loom")

FinishStatus = Literal["success", "errored", "interrupted"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
HEARTBEAT_INTERVAL_S = 10.0


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _lora_config(
    rank: int, seed: int | None, train_mlp: bool, train_attn: bool, train_unembed: bool, train_vision: bool
) -> types.LoraConfig:
    """A run's LoRA config; `train_vision` goes on the wire only when set (what the official SDK sends otherwise)."""
    return types.LoraConfig(
        rank=rank,
        seed=seed,
        train_mlp=train_mlp,
        train_attn=train_attn,
        train_unembed=train_unembed,
        train_vision=train_vision or None,
    )


class ServiceClient:
    """Connection + session; factory of the other clients."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        user_metadata: dict[str, str] | None = None,
        tags: list[str] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url or _env("LOOM_BASE_URL", "TINKER_BASE_URL") or DEFAULT_BASE_URL
        self._http = HttpClient(
            self.base_url,
            api_key or _env("LOOM_API_KEY", "TINKER_API_KEY"),
            timeout=timeout,
            retry=retry,
            transport=transport,
            headers=headers,
        )
        self._user_metadata = user_metadata
        self._tags = tags if tags is not None else [t for t in (_env("LOOM_TAGS", "TINKER_TAGS") or "").split(",") if t]
        self._project_id = project_id
        self._display_name = display_name
        self._heartbeat_interval = heartbeat_interval
        self._session_id: str | None = None
        self._session_lock: asyncio.Lock | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._counter_lock = threading.Lock()
        self._model_seq = itertools.count()
        self._sampling_seq = itertools.count()

    # ------------------------------------------------------------- lifecycle
    def close(self, status: FinishStatus = "success", detail: str | None = None) -> None:
        """Finish the session (if one was created), then stop the heartbeat and the SDK loop; the clients made
        here stop working. A session's first finish reason is kept; closing again does nothing."""
        if self._http.closed:
            return
        try:
            if self._session_id is not None:
                self._http.call(self._finish_session(status, detail))
        finally:
            self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.close("success")
            return
        try:
            self.close("errored" if issubclass(exc_type, Exception) else "interrupted")
        except errors.LoomError as exc:  # the error that ended the block is the one to see
            logger.warning("could not finish session %s: %s", self._session_id, exc)

    async def _finish_session(self, status: FinishStatus, detail: str | None) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        request = types.SessionFinishRequest(reason={"type": status}, detail=detail)
        await self._http.post_json(f"/api/v1/sessions/{self._session_id}/finish", request.to_wire())

    @property
    def session_id(self) -> str | None:
        return self._session_id

    # --------------------------------------------------------------- internal
    def _next_model_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._model_seq)

    def _next_sampling_session_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._sampling_seq)

    async def _ensure_session(self) -> str:
        """Create the session once (runs on the SDK loop)."""
        if self._session_id is not None:
            return self._session_id
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if self._session_id is None:
                request = types.CreateSessionRequest(
                    tags=self._tags,
                    user_metadata=self._user_metadata,
                    sdk_version=f"loom-{self._http.sdk_version}",
                    project_id=self._project_id,
                    display_name=self._display_name,
                )
                body = await self._http.post_json("/api/v1/create_session", request.to_wire())
                response = types.CreateSessionResponse.model_validate(body)
                for level, message in (
                    (logging.INFO, response.info_message),
                    (logging.WARNING, response.warning_message),
                    (logging.ERROR, response.error_message),
                ):
                    if message:
                        logger.log(level, "server: %s", message)
                self._session_id = response.session_id
                self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        return self._session_id

    async def _heartbeat_loop(self) -> None:
        assert self._session_id is not None
        body = types.SessionHeartbeatRequest(session_id=self._session_id).to_wire()
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            try:
                await self._http.post_json("/api/v1/session_heartbeat", body, retry=False, timeout=10.0)
            except asyncio.CancelledError:
                raise
            except errors.APIStatusError as exc:
                if exc.status_code == 410:  # the session was finished: nothing left to keep alive
                    return
                logger.warning("session heartbeat failed: %s", exc)
            except Exception as exc:  # a missed beat is not fatal
                logger.warning("session heartbeat failed: %s", exc)

    # ----------------------------------------------------------- capabilities
    async def _get_capabilities(self) -> types.GetServerCapabilitiesResponse:
        body = await self._http.get_json("/api/v1/get_server_capabilities")
        return types.GetServerCapabilitiesResponse.model_validate(body)

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """Models the server can train/sample."""
        return self._http.call(self._get_capabilities())

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await self._http.call_async(self._get_capabilities())

    # -------------------------------------------------------- training client
    async def _create_lora(
        self, base_model: str, lora: types.LoraConfig, user_metadata: dict[str, str] | None
    ) -> TrainingClient:
        if not (lora.train_mlp or lora.train_attn or lora.train_unembed or lora.train_vision):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed, train_vision must be True")
        session_id = await self._ensure_session()
        model_seq_id = self._next_model_seq_id()
        request = types.CreateModelRequest(
            session_id=session_id,
            model_seq_id=model_seq_id,
            base_model=base_model,
            user_metadata=user_metadata,
            lora_config=lora,
        )
        response: types.CreateModelResponse = await submit_and_poll(
            self._http,
            "/api/v1/create_model",
            request.to_wire(),
            types.CreateModelResponse,
            request_type="CreateModel",
        )
        return TrainingClient(self, response.model_id, base_model=base_model, model_seq_id=model_seq_id)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        train_vision: bool = False,
    ) -> TrainingClient:
        """Create a LoRA training run on ``base_model`` and return its client; ``train_vision`` (Loom only) also
        trains a vision-language model's vision tower and patch merger."""
        lora = _lora_config(rank, seed, train_mlp, train_attn, train_unembed, train_vision)
        return self._http.call(self._create_lora(base_model, lora, user_metadata))

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        train_vision: bool = False,
    ) -> TrainingClient:
        lora = _lora_config(rank, seed, train_mlp, train_attn, train_unembed, train_vision)
        return await self._http.call_async(self._create_lora(base_model, lora, user_metadata))

    async def _from_state(self, path: str, optimizer: bool, user_metadata: dict[str, str] | None) -> TrainingClient:
        info = await RestClient(self._http)._weights_info(path)
        lora = _lora_config(
            info.lora_rank or 32,
            None,
            info.train_mlp if info.train_mlp is not None else True,
            info.train_attn if info.train_attn is not None else True,
            info.train_unembed if info.train_unembed is not None else True,
            bool(info.train_vision),
        )
        client = await self._create_lora(info.base_model, lora, user_metadata)
        await client._load_coro(path, optimizer)
        return client

    def create_training_client_from_state(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """New training client initialised from a ``tinker://…/weights/…`` checkpoint (weights only)."""
        return self._http.call(self._from_state(path, False, user_metadata))

    async def create_training_client_from_state_async(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await self._http.call_async(self._from_state(path, False, user_metadata))

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """Like :meth:`create_training_client_from_state`, also restoring the Adam state."""
        return self._http.call(self._from_state(path, True, user_metadata))

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await self._http.call_async(self._from_state(path, True, user_metadata))

    # -------------------------------------------------------- sampling client
    async def _create_sampling(self, model_path: str | None, base_model: str | None) -> SamplingClient:
        if model_path is None and base_model is None:
            raise ValueError("give model_path or base_model")
        if model_path is not None and not model_path.startswith("tinker://"):
            raise ValueError(f"model_path must start with tinker://, got {model_path!r}")
        session_id = await self._ensure_session()
        request = types.CreateSamplingSessionRequest(
            session_id=session_id,
            sampling_session_seq_id=self._next_sampling_session_seq_id(),
            base_model=base_model,
            model_path=model_path,
        )
        body = await self._http.post_json("/api/v1/create_sampling_session", request.to_wire())
        response = types.CreateSamplingSessionResponse.model_validate(body)
        return SamplingClient(self._http, response.sampling_session_id, base_model=base_model, model_path=model_path)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Sampling client for saved sampler weights (``model_path``) or a base model."""
        return self._http.call(self._create_sampling(model_path, base_model))

    async def create_sampling_client_async(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient:
        return await self._http.call_async(self._create_sampling(model_path, base_model))

    # ------------------------------------------------------------ rest client
    def create_rest_client(self) -> RestClient:
        """Client for run/checkpoint management (no session needed)."""
        return RestClient(self._http)
