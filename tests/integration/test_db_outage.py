"""Issue 4: PostgreSQL paused for 10 s. The API answers 503 with `Retry-After` (never a 500, never a hung request),
`/readyz` reports not-ready, and training driven by the official tinker SDK and by ours (`loom`) recovers after
SIGCONT with every step applied exactly once.

A PRIVATE PostgreSQL is started for this module (tests/integration/private_postgres.py) and a real `loom serve`
runs against it; the shared server at 127.0.0.1:5432 is never touched. The pause is SIGSTOP of the postmaster and
all its backends.

Exactly once is checked three ways: the run's `next_seq_id` equals the number of ops submitted, every job of the run
is done after exactly one lease (`attempt == 1`), and the final loss equals that of an uninterrupted run with the
same seed.

Limits: the outage starts between two steps of the tinker loop (the worker holds no leased job when the database
stops); the loop then submits into the outage. Timings are printed, not asserted, apart from "no request waited for
the client's timeout".
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import tinker
from sqlalchemy import select
from tinker import types

import loom
from api.db.models import Job, JobKind, JobState, TrainingRun
from api.db.session import make_engine, make_session_factory
from tests.e2e.server import LoomServer, free_port
from tests.integration.private_postgres import PrivatePostgres, PrivatePostgresUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KIMI = "loom/tiny-kimi-k2"
PAUSE_S = 10.0
CLIENT_TIMEOUT_S = 30.0
"""Per-request timeout of the raw HTTP checks: a request that hangs on the paused database fails the test."""
STEPS_BEFORE, STEPS_ACROSS = 2, 3
LEARNING_RATE = 2e-3
RESULT_TIMEOUT_S = 240.0
TOKENS = [11, 523, 87, 2045, 16, 991, 42, 7, 318, 64, 2048, 5]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
    except PrivatePostgresUnavailable as exc:
        pg.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    except BaseException:
        pg.stop()
        raise
    yield pg
    pg.stop()  # SIGCONT first, then shutdown


@pytest.fixture(scope="module")
def server(postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoomServer]:
    env = {"LOOM_DATABASE_URL": postgres.url, "LOOM_BASE_MODELS": KIMI}
    srv = LoomServer(tmp_path_factory.mktemp("loom-db-outage"), free_port(), env_extra=env).start()
    yield srv
    postgres.resume()  # a server cannot shut down cleanly on a stopped database
    srv.stop()


@contextmanager
def paused(postgres: PrivatePostgres) -> Iterator[float]:
    """SIGSTOP the database for the block (yields the monotonic start); SIGCONT even if the block fails."""
    postgres.pause()
    try:
        yield time.monotonic()
    finally:
        postgres.resume()


def datum(wire=types):
    return wire.Datum(model_input=wire.ModelInput.from_ints(TOKENS[:-1]), loss_fn_inputs={"target_tokens": TOKENS[1:]})


class TinkerLoop(threading.Thread):
    """forward_backward + optim_step per step with the official SDK; stops before step `pause_at` until `go`."""

    def __init__(self, trainer, steps: int, pause_at: int) -> None:
        super().__init__(daemon=True)
        self.trainer, self.steps, self.pause_at = trainer, steps, pause_at
        self.reached, self.go = threading.Event(), threading.Event()
        self.losses: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step in range(self.steps):
                if step == self.pause_at:
                    self.reached.set()
                    self.go.wait(RESULT_TIMEOUT_S)
                fb = self.trainer.forward_backward([datum()], "cross_entropy")
                opt = self.trainer.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
                self.losses.append(fb.result(timeout=RESULT_TIMEOUT_S).metrics["loss:sum"])
                opt.result(timeout=RESULT_TIMEOUT_S)
        except BaseException as exc:  # reported by the test
            self.error = exc


def timed_get(url: str, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(url, timeout=CLIENT_TIMEOUT_S, **kwargs)
    return response, time.monotonic() - started


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert float(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "service_unavailable"


def wait_ready(server: LoomServer, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if httpx.get(f"{server.url}/readyz", timeout=CLIENT_TIMEOUT_S).status_code == 200:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"/readyz not ready {timeout}s after the database resumed")


def run_jobs(url: str, model_id: str) -> tuple[TrainingRun, list[Job]]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            run = session.get(TrainingRun, model_id)
            jobs = list(session.scalars(select(Job).where(Job.model_id == model_id).order_by(Job.seq_id)))
            return run, jobs
    finally:
        engine.dispose()


def assert_applied_once(url: str, model_id: str, steps: int) -> None:
    run, jobs = run_jobs(url, model_id)
    assert run.next_seq_id == 1 + 2 * steps  # seq 0 creates the run, then one forward_backward + optim_step a step
    assert [(j.seq_id, j.state, j.attempt) for j in jobs] == [(s, JobState.DONE.value, 1) for s in range(1 + 2 * steps)]
    assert sum(j.kind == JobKind.OPTIM_STEP.value for j in jobs) == steps


def test_paused_database_answers_503_and_training_recovers(
    server: LoomServer, postgres: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", server.url)
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    auth = {"X-API-Key": server.api_key}
    assert httpx.get(f"{server.url}/readyz", timeout=CLIENT_TIMEOUT_S).json() == {"status": "ready"}

    service = tinker.ServiceClient()
    trainer = service.create_lora_training_client(base_model=KIMI, rank=4, seed=7).result()
    loop = TinkerLoop(trainer, STEPS_BEFORE + STEPS_ACROSS, pause_at=STEPS_BEFORE)
    loop.start()
    assert loop.reached.wait(RESULT_TIMEOUT_S), loop.error

    with loom.ServiceClient(base_url=server.url, api_key=server.api_key) as ours:
        our_trainer = ours.create_lora_training_client(KIMI, rank=4, seed=7)
        with paused(postgres) as pause_started:
            loop.go.set()  # the tinker loop submits its remaining steps into the outage
            our_fb = our_trainer.forward_backward([datum(loom.types)], "cross_entropy")
            our_opt = our_trainer.optim_step(loom.types.AdamParams(learning_rate=LEARNING_RATE))

            ready, ready_s = timed_get(f"{server.url}/readyz")
            assert_unavailable(ready)
            caps, caps_s = timed_get(f"{server.url}/api/v1/get_server_capabilities", headers=auth)
            assert_unavailable(caps)
            again, again_s = timed_get(f"{server.url}/api/v1/get_server_capabilities", headers=auth)
            assert_unavailable(again)
            print(f"\nduring the pause: /readyz 503 in {ready_s:.2f}s, get_server_capabilities 503 in {caps_s:.2f}s, "
                  f"then {again_s:.2f}s")  # fmt: skip
            assert time.monotonic() - pause_started < PAUSE_S, "the 503s took longer than the pause itself"
            time.sleep(PAUSE_S - (time.monotonic() - pause_started))
        resumed = time.monotonic()
        print(f"/readyz ready {wait_ready(server):.2f}s after SIGCONT")

        loop.join(RESULT_TIMEOUT_S)
        assert not loop.is_alive(), "the tinker loop did not finish after the database resumed"
        assert loop.error is None, repr(loop.error)
        print(f"tinker loop finished {time.monotonic() - resumed:.2f}s after SIGCONT; losses {loop.losses}")
        our_loss = our_fb.result(timeout=RESULT_TIMEOUT_S).metrics["loss:sum"]
        our_opt.result(timeout=RESULT_TIMEOUT_S)
        assert our_loss == pytest.approx(loop.losses[0], rel=1e-4)  # same seed, same data, first step
        assert_applied_once(postgres.url, our_trainer.model_id, steps=1)
        assert ours.get_server_capabilities().supported_models

    steps = STEPS_BEFORE + STEPS_ACROSS
    assert_applied_once(postgres.url, trainer.model_id, steps=steps)
    assert len(set(loop.losses)) == steps  # every step moved the weights, so a lost or repeated one would show

    # The interrupted run ends with the weights of an uninterrupted one: no step was lost or applied twice.
    reference = service.create_lora_training_client(base_model=KIMI, rank=4, seed=7).result()
    for _ in range(steps):
        reference.forward_backward([datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT_S)
        reference.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result(timeout=RESULT_TIMEOUT_S)
    final = trainer.forward([datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT_S).metrics["loss:sum"]
    expected = reference.forward([datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT_S).metrics["loss:sum"]
    assert final == pytest.approx(expected, rel=1e-4)

    assert "Exception in ASGI application" not in server.log_path.read_text(), "a request failed with a 500"
