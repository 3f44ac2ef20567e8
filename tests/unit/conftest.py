"""Fixtures for unit tests: a migrated temporary SQLite database (api/db), and tokenizer folders built once per
test session (converting ~160k BPE ranks takes seconds)."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import ClientSession, TrainingRun
from api.db.session import make_engine, make_session_factory, upgrade_to_head


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'loom.db'}"
    upgrade_to_head(url)
    return url


@pytest.fixture
def session_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def make_run(session_factory: sessionmaker[Session]) -> Callable[..., str]:
    """Insert a training run (and its client session); returns the run id."""

    def make(owner: str = "alice", base_model: str = "tiny-kimi-k2", model_seq_id: int = 0) -> str:
        with session_factory.begin() as session:
            client_session = ClientSession(owner=owner)
            session.add(client_session)
            session.flush()
            run = TrainingRun(
                id=f"{client_session.id}:train:{model_seq_id}",
                owner=owner,
                session_id=client_session.id,
                model_seq_id=model_seq_id,
                base_model=base_model,
                lora_rank=8,
                train_attn=True,
                train_mlp=True,
                train_unembed=False,
            )
            session.add(run)
            return run.id

    return make


@pytest.fixture(scope="session")
def tiny_kimi_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kimi K2-layout tokenizer folder over the o200k_base prefix (`build_tiny_kimi_tokenizer`)."""
    from worker.models.tokenizer_folders import build_tiny_kimi_tokenizer  # the ML stack only where needed

    folder = tmp_path_factory.mktemp("tiny-kimi-tokenizer")
    build_tiny_kimi_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def qwen3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3's tokenizer folder (`build_qwen3_tokenizer`)."""
    from worker.models.tokenizer_folders import build_qwen3_tokenizer

    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    build_qwen3_tokenizer(folder)
    return folder
