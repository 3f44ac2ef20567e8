"""`POST /api/v1/create_custom_loss`: store a traced loss (SDK 0.38, `custom_loss_server_side`) for its session.

The graph is checked against the server's list of allowed operations (`contract/custom_loss_graph.py`) before
it is stored; a refused graph is a 400 naming the offending node. The answer is a future, already done, whose
result is `{"loss_id": ...}`: `forward_backward` then names the loss with `loss_fn="custom"` and
`loss_fn_config={"loss_id": ...}`, and the worker runs it in the same pass as every other loss.

Limits: a loss belongs to the session that created it (`api/routers/training.py` refuses it from a run of another
session); re-creating the same `custom_loss_seq_id` with a different graph is a 409.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.db.custom_losses import custom_loss_id, store_custom_loss
from api.db.jobs import record_answered
from api.deps import State, Tenant, live_session
from api.errors import APIError, ErrorCode, invalid
from contract.custom_loss_graph import InvalidCustomLoss, check_custom_loss
from contract.jobs import CustomLossSpec
from loom.types import CreateCustomLossRequest, CreateCustomLossResponse, UntypedAPIFuture

router = APIRouter(prefix="/api/v1")

CREATE_CUSTOM_LOSS = "create_custom_loss"
"""The kind of the (already done) job that answers a create."""


@router.post("/create_custom_loss")
def create_custom_loss(body: CreateCustomLossRequest, state: State, owner: Tenant) -> dict[str, Any]:
    try:
        check_custom_loss(body.inputs, body.graph)
    except InvalidCustomLoss as exc:
        raise invalid(f"custom loss {body.name!r}: {exc}", exc.param) from exc
    spec = CustomLossSpec(name=body.name, inputs=body.inputs, graph=body.graph)
    loss_id = custom_loss_id(body.session_id, body.custom_loss_seq_id)
    request_id = f"{loss_id}:create"
    with state.transaction() as session:
        live_session(session, owner, body.session_id)
        if not store_custom_loss(
            session, owner=owner, session_id=body.session_id, seq_id=body.custom_loss_seq_id, spec=spec
        ):
            raise APIError(
                409,
                ErrorCode.CONFLICT,
                f"custom_loss_seq_id {body.custom_loss_seq_id} of this session already holds a different loss",
                "custom_loss_seq_id",
            )
        result = CreateCustomLossResponse(loss_id=loss_id).to_wire()
        record_answered(session, job_id=request_id, owner=owner, kind=CREATE_CUSTOM_LOSS, result=result)
    return UntypedAPIFuture(request_id=request_id).to_wire()
