"""Fixtures for integration tests: a fresh, throw-away PostgreSQL database, an S3 server (moto_server), and
`ranks_leave_no_shm` (from deepspeed_fixtures.py) for tests that run DeepSpeed ranks.

The server is ``LOOM_TEST_POSTGRES_URL`` (default: the local trust-auth server's
``test`` database, used only to create and drop the per-test database). If it
cannot be reached the test is skipped, except under ``CI=true``, where it fails.
"""

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from contract.checkpoint_s3 import env_client
from tests.e2e.server import free_port
from tests.integration.deepspeed_fixtures import ranks_leave_no_shm  # noqa: F401 - a fixture, used by name

ADMIN_URL = os.environ.get("LOOM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        connection = admin.connect()
    except OperationalError as error:
        admin.dispose()
        message = f"PostgreSQL at {make_url(ADMIN_URL).render_as_string()} is unreachable: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"loom_test_{secrets.token_hex(6)}"
    connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        connection.close()
        admin.dispose()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60  # start-up wait only; no test asserts on time
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not listen on {port}: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_env(moto_endpoint, tmp_path_factory) -> Iterator[str]:
    """The standard AWS variables pointed at moto, so the code under test configures itself from the env."""
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        yield moto_endpoint


@pytest.fixture
def s3(s3_env):
    return env_client()


@pytest.fixture
def bucket(s3) -> str:
    name = f"loom-test-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    return name
