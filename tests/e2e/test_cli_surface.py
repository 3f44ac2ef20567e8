"""Contract test: every command of the official `tinker` CLI (SDK 0.38) works against a live `loom serve`, run as a
subprocess with `--format json` the way a user scripts it, its JSON output parsed and checked.

The commands are enumerated from the CLI's own click tree, so a command a newer SDK adds fails the test until it is
run here (or listed in NOT_RUN with a reason). They run on a run trained a step with a training, a sampler and an
external-weights checkpoint; commands that print nothing (publish, set-ttl, ...) are checked through `checkpoint
info`. The only failure allowed is a deliberate refusal listed in REFUSED; the failure message lists every command
that failed with its exit code and error output. The CLI gets its own HOME, so `auth login`/`logout` never touch
the real credential store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
import tinker
from tinker import types
from tinker.cli.__main__ import main_cli

from contract.catalogue import SMOLLM2
from tests.e2e.server import LoomServer
from tests.e2e.surface import Ledger, Refusal, need

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

SMOL = SMOLLM2.name
TINKER = Path(sys.executable).with_name("tinker")


class CliFailed(Exception):
    """A command exited non-zero or printed what it should not have."""

    def __init__(self, command: str, result: subprocess.CompletedProcess[str]) -> None:
        self.stderr = result.stderr
        super().__init__(f"`tinker {command}` exited {result.returncode}: {result.stderr.strip()[-300:]}")


REFUSED: dict[str, Refusal] = {
    # The CLI's whoami is RestClient.whoami, which reads identity from JWT claims; Loom issues API keys only.
    "auth whoami": Refusal(
        "identity comes only from JWT claims, and Loom issues API keys",
        lambda error: isinstance(error, CliFailed) and "requires JWT auth" in error.stderr,
    ),
}

NOT_RUN: dict[str, str] = {
    "checkpoint push-hf": "uploads to the Hugging Face Hub, which an offline self-hosted deployment cannot reach; "
    "its Loom side (exporting and downloading the adapter) is what `checkpoint download` runs",
}


def cli_commands() -> set[str]:
    """Every leaf command of the `tinker` CLI, as the words a user types (`checkpoint set-ttl`)."""
    context = click.Context(main_cli)

    def walk(group: click.Group, prefix: tuple[str, ...]) -> Iterator[str]:
        for name in group.list_commands(context):
            command = group.get_command(context, name)
            if isinstance(command, click.Group):
                yield from walk(command, (*prefix, name))
            else:
                yield " ".join((*prefix, name))

    return set(walk(main_cli, ()))


class Cli:
    """Runs `tinker --format json ...` against the server, in its own HOME and working directory."""

    def __init__(self, server: LoomServer, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": server.api_key, "HOME": str(home)}

    def text(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(TINKER), "--format", "json", *args],
            env=self.env,
            cwd=self.home,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise CliFailed(" ".join(args), result)
        return result.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.text(*args))

    def silent(self, *args: str) -> None:
        """A command that prints nothing on success (publish, set-ttl, ...)."""
        output = self.text(*args)
        assert not output.strip(), output


def test_allow_lists_name_real_commands() -> None:
    assert set(REFUSED) | set(NOT_RUN) <= cli_commands()


def test_every_cli_command_answers(server: LoomServer, tmp_path: Path) -> None:
    ledger = Ledger(REFUSED)
    cli = Cli(server, tmp_path)
    run_commands(ledger, cli, trained_run(server))
    missed = cli_commands() - set(NOT_RUN) - set(ledger.outcomes)
    assert not missed, f"tinker CLI commands this test never ran: {sorted(missed)}"
    failures = ledger.lines("failed")
    assert not failures, ledger.report()


def trained_run(server: LoomServer) -> dict[str, str]:
    """A run trained one step, with a training, a sampler and (where the server can) an external checkpoint."""
    service = tinker.ServiceClient(base_url=server.url, api_key=server.api_key)
    training = service.create_lora_training_client(SMOL, rank=4, seed=0).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [0.0, 1.0, 1.0, 1.0]},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    run = {
        "run_id": training.model_id,
        "session_id": service.holder.get_session_id(),
        "state": training.save_state("cli-state").result().path,
        "sampler": training.save_weights_for_sampler("cli-sampler").result().path,
    }
    try:  # the run's last ordered op: later ones would wait forever on a server that lacks the route
        run["external"] = training.save_weights_external("cli-external").result().path
    except tinker.APIStatusError:
        pass  # `checkpoint download` of the external path is then reported as blocked
    return run


def run_commands(ledger: Ledger, cli: Cli, run: dict[str, str]) -> None:
    call = ledger.call
    state, run_id = run["state"], run["run_id"]

    def info() -> dict:
        return cli.json("checkpoint", "info", state)

    call("version", lambda: expect_in(tinker.__version__, cli.text("version")))
    call("model list", lambda: expect_in(SMOL, {m["model_name"] for m in cli.json("model", "list")["models"]}))
    call("run list", lambda: expect_in(run_id, {r["training_run_id"] for r in cli.json("run", "list")["runs"]}))
    call("run info", lambda: expect(cli.json("run", "info", run_id)["training_run_id"], run_id))
    call(
        "checkpoint list",
        lambda: expect_in(state, listed(cli.json("checkpoint", "list", "--run-id", run_id))),
        variant="--run-id",
    )
    call("checkpoint list", lambda: expect_in(state, listed(cli.json("checkpoint", "list"))), variant="all runs")
    call("checkpoint info", lambda: (expect(info()["tinker_path"], state), expect(info()["lora_rank"], 4)))
    call("checkpoint publish", lambda: (cli.silent("checkpoint", "publish", state), expect(info()["public"], True)))
    call(
        "checkpoint unpublish", lambda: (cli.silent("checkpoint", "unpublish", state), expect(info()["public"], False))
    )
    call(
        "checkpoint set-ttl",
        lambda: (cli.silent("checkpoint", "set-ttl", state, "--ttl", "86400"), expect_set(info()["expires_at"])),
        variant="--ttl",
    )
    call(
        "checkpoint set-ttl",
        lambda: (cli.silent("checkpoint", "set-ttl", state, "--remove"), expect(info()["expires_at"], None)),
        variant="--remove",
    )
    call("checkpoint download", lambda: downloaded(cli, state), variant="training checkpoint")
    call(
        "checkpoint download",
        lambda: downloaded(cli, need(run.get("external"), "TrainingClient.save_weights_external")),
        variant="external weights",
    )
    call(
        "checkpoint delete",
        lambda: (
            expect(cli.json("checkpoint", "delete", run["sampler"], "--yes"), {"deleted_count": 1, "failed": []}),
            expect_out(run["sampler"], listed(cli.json("checkpoint", "list", "--run-id", run_id))),
        ),
    )
    session = run["session_id"]
    call(
        "session export-trace",
        lambda: expect(cli.json("session", "export-trace", session, "--url-only")["session_id"], session),
        variant="--url-only",
    )
    call(
        "session export-trace",
        lambda: expect_file(
            cli.home / cli.json("session", "export-trace", session, "--output", "trace.pftrace")["destination"]
        ),
        variant="download",
    )
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    window = [(hour + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ") for h in (-1, 1)]
    call("billing usage", lambda: trained_in(cli.json("billing", "usage", *window), session))
    call("billing checkpoint-storage", lambda: stores_bytes(cli.json("billing", "checkpoint-storage")))
    call("auth status", lambda: expect_in("Tinker accessible: yes", cli.text("auth", "status")))
    logged_in = call("auth login", lambda: cli.text("auth", "login", stdin=cli.env["TINKER_API_KEY"] + "\n"))
    call("auth whoami", lambda: cli.json("auth", "whoami"))
    call("auth logout", lambda: (need(logged_in, "auth login"), cli.text("auth", "logout")))


def listed(output: dict) -> set[str]:
    return {checkpoint["tinker_path"] for checkpoint in output["checkpoints"]}


def expect(value, wanted):
    assert value == wanted, (value, wanted)


def expect_in(item, collection) -> None:
    assert item in collection, (item, collection)


def expect_out(item, collection) -> None:
    assert item not in collection, (item, collection)


def expect_set(value) -> None:
    assert value is not None


def expect_file(path: Path) -> None:
    assert Path(path).stat().st_size > 0, path


def downloaded(cli: Cli, path: str) -> None:
    """`checkpoint download` writes a PEFT adapter (weights and config) into a folder named after the checkpoint."""
    output = cli.json("checkpoint", "download", path, "--output", str(cli.home / "downloads"))
    folder = Path(output["destination"])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        expect_file(str(folder / name))
    expect(json.loads((folder / "adapter_config.json").read_text())["r"], 4)


def trained_in(usage: dict, session_id: str) -> None:
    tokens = sum(
        row["event_info"]["token_count"]
        for row in usage["data"]
        if row.get("session_id") == session_id and row["event_info"]["type"] == "training"
    )
    assert tokens > 0, usage


def stores_bytes(usage: dict) -> None:
    assert sum(row["size_bytes"] for row in usage["data"]) > 0, usage
