"""Loom SDK: a thin client for the Tinker wire protocol (``/api/v1/...``).

Depends on httpx + pydantic only. Entry point::

    import loom
    from loom import types

    service = loom.ServiceClient()            # LOOM_BASE_URL / LOOM_API_KEY (or TINKER_*)
    trainer = service.create_lora_training_client("tiny-kimi-k2", rank=8)
    fb = trainer.forward_backward(data, "cross_entropy")
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-4))
    print(fb.result().metrics, step.result())

Modules: :mod:`.types` (wire models), :mod:`.errors`, :mod:`.http` (transport,
retries, idempotency keys), :mod:`.futures` (APIFuture, polling),
:mod:`.service_client`, :mod:`.training_client`, :mod:`.sampling_client`,
:mod:`.rest_client`, :mod:`.tokenizers` (the server's tokenizers, cached locally).
"""

from . import types
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoomError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    UnprocessableEntityError,
)
from .futures import APIFuture
from .http import RetryPolicy
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient
from .types import AdamParams, Datum, ModelInput, SamplingParams, TensorData

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "Datum",
    "InternalServerError",
    "LoomError",
    "ModelInput",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "RetryPolicy",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "UnprocessableEntityError",
    "types",
]
