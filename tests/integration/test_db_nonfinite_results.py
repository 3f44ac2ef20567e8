"""A diverged run's NaN/inf results round-trip through a real PostgreSQL `json` column (and SQLite)."""

import math

import pytest

from api.db.jobs import claim_ready_jobs, complete_job, get_job, submit_job
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from tests.job_payloads import payload

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_non_finite_floats_survive_the_database(backend, request, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    result = {
        "metrics": {"loss:sum": math.nan},
        "loss_fn_outputs": [{"logprobs": {"data": [-math.inf, 0.5, math.inf]}}],
    }
    with factory.begin() as session:
        job, _ = submit_job(session, owner="a", base_model="m", model_id=None, seq_id=None, payload=payload("sample"))
    with factory.begin() as session:
        (claimed,) = claim_ready_jobs(session, base_models=["m"], worker_id="w", lease_seconds=60, limit=1)
        assert complete_job(session, claimed.id, claimed.fencing_token, result)
    with factory.begin() as session:
        stored = get_job(session, job.id, "a").result
    engine.dispose()
    assert math.isnan(stored["metrics"]["loss:sum"])
    assert stored["loss_fn_outputs"][0]["logprobs"]["data"][0] == -math.inf
    assert stored["loss_fn_outputs"][0]["logprobs"]["data"][1:] == [0.5, math.inf]
