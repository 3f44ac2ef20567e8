"""The web console in real headless Chromium (Debian's, driven by Playwright) against a real `loom serve`.

Each test signs in with a key of its own tenant (made with `loom keys create`; the operator, with the server's own
key). Covered: `/` leads to the sign-in form, a wrong key is refused with a message and a valid one signs in; a run
the official `tinker` SDK trains is plotted and its loss curve gains points while the SDK keeps stepping (the page
polls, nothing is reloaded); its exported adapter is listed with a copyable `tinker://` path and downloads through
the console as a PEFT adapter, and the console deletes it; the usage page counts each run's trained tokens (as many
as the sessions' hourly events and the signed-in key's row of the usage report) and exports both as CSV, and the
server's report CSV (per hour, key and run) downloads with its columns; the queue page shows a request of the
tenant's while it waits for the op before it (and drops it once both ran), the live workers, the served base models
and a limit set with `loom tenants set`; an operator creates a tenant and changes its limits on the tenants page,
and the new tenant's first key signs in, without a Tenants link and told the page is for operators; a key revoked in
the console fails its next request (the SDK's routes answer 401, a tab signed in with it is signed out with a
message); a second tenant sees none of the first tenant's runs, and gets 404 for the first one's metrics; an alias
set on the aliases page chats in the playground (streamed) and is re-pointed to another checkpoint.

Waiting is Playwright's auto-waiting `expect(...)` on page conditions. Screenshots go to `$LOOM_TEST_ARTIFACTS`
(or the test's temporary folder).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tinker
from playwright.sync_api import Browser, Page, expect, sync_playwright
from tinker import types

from loom.types import USAGE_REPORT_COLUMNS
from tests.e2e.server import LoomServer, create_key, loom_cli
from tests.e2e.wire import SMOL, datum, fb_body, new_run, result

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 30_000
"""How long an `expect` waits for the page (a poll is every 2 s; a SmolLM2 step takes about 1 s)."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it as root)")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("LOOM_TEST_ARTIFACTS")
    folder = Path(named) if named else tmp_path_factory.mktemp("console-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser: Browser, server: LoomServer) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1366, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    opened.on("dialog", lambda dialog: dialog.accept())  # the console's confirm() before deleting or revoking
    blocked: list[str] = []  # anything the pages' Content-Security-Policy refused
    context.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
    yield opened
    context.close()
    assert not blocked, blocked


def sign_in(page: Page, key: str, path: str = "/") -> None:
    page.goto(path)
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#whoami")).not_to_be_empty()


def _datum(seed: int) -> types.Datum:
    rng = random.Random(seed)
    tokens = [rng.randrange(100, 5000) for _ in range(12)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )


def train_step(training: tinker.TrainingClient, seed: int) -> None:
    training.forward_backward([_datum(seed)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()


@dataclass
class Trainer:
    """A tenant of its own with two SmolLM2 runs the official SDK trained one step each."""

    key: str
    training: tinker.TrainingClient
    baseline: tinker.TrainingClient


@pytest.fixture(scope="module")
def trainer(server: LoomServer) -> Trainer:
    key = create_key(server.data_dir, "console-trainer")
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    runs = [service.create_lora_training_client(base_model=SMOL, rank=4).result() for _ in range(2)]
    for seed, training in enumerate(runs):
        train_step(training, seed)
    return Trainer(key, *runs)


def test_a_wrong_key_is_refused_and_a_valid_one_signs_in(page: Page, server: LoomServer, artifacts: Path) -> None:
    key = create_key(server.data_dir, "console-signin")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/console/runs$"))
    page.get_by_label("API key", exact=True).fill("tml-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").first).to_have_text(re.compile("invalid or has been revoked"))
    page.screenshot(path=artifacts / "console-signin-refused.png")
    sign_in(page, key)
    expect(page.locator("#whoami")).to_contain_text("console-signin")
    expect(page.get_by_text("No training runs yet.")).to_be_visible()
    page.get_by_role("link", name="API keys").click()  # the key stays signed in across pages (sessionStorage)
    expect(page.get_by_role("heading", name="Your keys")).to_be_visible()
    expect(page.locator("#whoami")).to_contain_text("console-signin")


def test_a_run_is_plotted_live_and_its_adapter_downloads(
    page: Page, server: LoomServer, trainer: Trainer, artifacts: Path, tmp_path: Path
) -> None:
    key, training, baseline = trainer.key, trainer.training, trainer.baseline
    run_id = training.model_id
    sign_in(page, key)
    page.get_by_label(f"Plot run {run_id}").check()
    page.get_by_label(f"Plot run {baseline.model_id}").check()
    loss = page.locator('figure[data-metric="loss:sum"]')
    expect(loss).to_have_attribute("data-steps", "1")
    for seed in (2, 3):  # the page keeps polling while the SDK trains
        train_step(training, seed)
    expect(loss).to_have_attribute("data-steps", "3")
    expect(loss.locator("canvas")).to_be_visible()
    caption = re.compile(rf"loss:sum — 3 steps; {run_id}: [0-9.]+ at step 2; {baseline.model_id}: [0-9.]+ at step 0")
    expect(loss.locator("figcaption")).to_have_text(caption)  # both runs overlaid
    page.get_by_label("X axis").select_option("time")
    expect(loss.locator(".u-legend th").first).to_have_text(re.compile("^time"))
    expect(loss).to_have_attribute("data-steps", "3")
    page.get_by_label("X axis").select_option("step")
    expect(loss.locator(".u-legend th").first).to_have_text(re.compile("^step"))
    page.screenshot(path=artifacts / "console-runs.png", full_page=True)

    path = training.save_weights_external("console").result().path
    page.get_by_role("button", name=f"Checkpoints of run {run_id}").click()
    row = page.locator(f'tr[data-path="{path}"]')
    expect(row).to_contain_text("external")
    row.get_by_role("button", name=f"Copy {path}").click()
    expect(row.get_by_role("button", name=f"Copy {path}")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == path
    row.get_by_role("button", name=f"Download {path}").click()
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with page.expect_download() as download:
            page.get_by_role("link", name=name).click()
        download.value.save_as(tmp_path / name)
        files[name] = (tmp_path / name).read_bytes()
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["r"] == 4, config
    header = struct.unpack("<Q", files["adapter_model.safetensors"][:8])[0]
    tensors = json.loads(files["adapter_model.safetensors"][8 : 8 + header])
    assert any("lora_A" in name for name in tensors), sorted(tensors)[:5]
    page.screenshot(path=artifacts / "console-checkpoints.png", full_page=True)

    row.get_by_role("button", name=f"Delete {path}").click()
    expect(row).to_have_count(0)
    listed = httpx.get(f"{server.url}/api/v1/training_runs/{run_id}/checkpoints", headers={"X-API-Key": key})
    assert path not in [c["tinker_path"] for c in listed.json()["checkpoints"]]


def test_an_alias_set_in_the_console_chats_in_the_playground_and_re_points(
    page: Page, server: LoomServer, trainer: Trainer, artifacts: Path
) -> None:
    first = trainer.baseline.save_weights_for_sampler("console-chat").result().path
    second = trainer.training.save_weights_for_sampler("console-chat").result().path
    sign_in(page, trainer.key)
    page.get_by_role("button", name=f"Checkpoints of run {trainer.baseline.model_id}").click()
    expect(page.get_by_role("link", name=f"Chat with {first}")).to_have_attribute("href", re.compile("playground"))
    page.get_by_role("link", name="Aliases").click()
    page.get_by_label("Alias", exact=True).fill("console-agent:latest")
    page.get_by_label("Checkpoint", exact=True).select_option(first)
    page.get_by_role("button", name="Set alias").click()
    row = page.locator('tr[data-alias="console-agent:latest"]')
    expect(row).to_contain_text(first)

    row.get_by_role("link", name="Chat with console-agent:latest").click()
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()  # still signed in: same tab
    expect(page.get_by_label("Model")).to_have_value("console-agent:latest")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Token logprobs").check()
    page.get_by_label("Message").fill("Name a colour.")
    page.get_by_label("Message").press("Control+Enter")  # keyboard only
    answer = page.locator('#transcript li[data-role="assistant"]')
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).not_to_be_empty()
    expect(page.locator('#transcript li[data-role="user"]')).to_have_text(re.compile("Name a colour."))
    answer.locator("summary").click()
    tokens = answer.locator(".token")
    expect(tokens.first).to_have_attribute("title", re.compile(r"^logprob -?[0-9.]+$"))
    expect(answer.locator("summary")).to_have_text(re.compile(rf"^{tokens.count()} tokens, mean logprob -?[0-9.]+$"))
    assert answer.locator(".text").inner_text().startswith(tokens.first.text_content())
    page.screenshot(path=artifacts / "console-playground.png", full_page=True)

    page.go_back()
    row.get_by_role("button", name="Re-point console-agent:latest").click()
    expect(page.get_by_label("Alias", exact=True)).to_have_value("console-agent:latest")
    page.get_by_label("Checkpoint", exact=True).select_option(second)
    page.get_by_role("button", name="Set alias").click()
    expect(row).to_contain_text(second)
    aliases = httpx.get(f"{server.url}/api/v1/aliases", headers={"X-API-Key": trainer.key}).json()["aliases"]
    assert [(a["name"], a["tinker_path"]) for a in aliases] == [("console-agent:latest", second)]


def _csv(page: Page, button: str, path: Path) -> list[dict[str, str]]:
    with page.expect_download() as download:
        page.get_by_role("button", name=button).click()
    download.value.save_as(path)
    return list(csv.DictReader(path.open()))


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_usage_counts_each_runs_tokens_and_exports_csv(
    page: Page, trainer: Trainer, artifacts: Path, tmp_path: Path
) -> None:
    sign_in(page, trainer.key, "/console/usage")
    per_run = {}
    for training in (trainer.training, trainer.baseline):
        row = page.locator(f'#runs-usage-table tr[data-run="{training.model_id}"]')
        expect(row.locator("td").nth(1)).to_have_text(SMOL)
        per_run[training.model_id] = _number(row.locator("td").nth(2).inner_text())
        assert per_run[training.model_id] >= 11  # a step of 11 input tokens at least
    sessions = page.locator("#usage-table tbody tr")
    expect(sessions.first.locator("td").nth(2)).to_have_text(SMOL)
    trained = sum(_number(cell) for cell in sessions.locator("td:nth-child(4)").all_inner_texts())
    assert trained == sum(per_run.values())  # both routes count the same tokens
    page.screenshot(path=artifacts / "console-usage.png", full_page=True)

    runs = _csv(page, "Export runs CSV", tmp_path / "runs.csv")
    assert {r["training_run_id"]: int(r["training_tokens"]) for r in runs} == per_run
    hourly = _csv(page, "Export hourly CSV", tmp_path / "hourly.csv")
    assert sum(int(r["quantity"]) for r in hourly if r["type"] == "training") == trained

    prefix = trainer.key[:12]
    key_row = page.locator(f'#keys-usage-table tr[data-key="{prefix}"]')
    expect(key_row.locator("td").first).to_have_text("cli")  # `loom keys create`'s default name
    assert _number(key_row.locator("td").nth(2).inner_text()) == trained  # one key made every request
    report = _csv(page, "Download CSV (per hour, key and run)", tmp_path / "report.csv")
    assert (tmp_path / "report.csv").read_text().splitlines()[0] == ",".join(USAGE_REPORT_COLUMNS)
    assert sum(int(r["tokens_trained"]) for r in report if r["api_key_prefix"] == prefix) == trained


def test_the_queue_page_shows_my_waiting_request_workers_base_models_and_my_limits(
    page: Page, server: LoomServer, artifacts: Path
) -> None:
    loom_cli(server.data_dir, "tenants", "set", "console-limited", "--tokens-per-minute", "1000")
    key = create_key(server.data_dir, "console-limited")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60) as http:
        run_id = new_run(http)
        ops = [fb_body(run_id, seq_id, [datum(list(range(100, 112)))]) for seq_id in (1, 2)]
        waiting = http.post("/api/v1/forward_backward", json=ops[1]).json()["request_id"]  # waits for seq_id 1
        sign_in(page, key, "/console/queue")
        row = page.locator(f'#queue-table tr[data-request="{waiting}"]')
        expect(row.locator("td").nth(2)).to_have_text(run_id)
        expect(row.locator("td").nth(4)).to_have_text("queued")
        tokens = page.locator('#limits-table tr[data-limit="tokens_per_minute"] td')
        expect(tokens.nth(1)).to_have_text(re.compile(r"^1,?000$"))
        expect(tokens.nth(2)).to_have_text(re.compile(r"^in [0-9]+ s$"))
        expect(page.locator('#limits-table tr[data-limit="requests_per_minute"] td').nth(1)).to_have_text("no limit")
        expect(page.locator(f'#workers-table tr[data-worker="embedded:{SMOL}"]')).to_contain_text(SMOL)
        expect(page.locator("#base-models")).to_contain_text(SMOL)
        page.screenshot(path=artifacts / "console-queue.png", full_page=True)
        first = http.post("/api/v1/forward_backward", json=ops[0]).json()["request_id"]
        for request_id in (first, waiting):
            assert "loss_fn_outputs" in result(http, request_id)
    expect(row).to_have_count(0)  # the page keeps polling
    expect(page.get_by_text("Nothing of yours is queued or running.")).to_be_visible()


def test_an_operator_creates_a_tenant_whose_key_is_no_operators(
    page: Page, server: LoomServer, artifacts: Path
) -> None:
    sign_in(page, server.api_key, "/console/tenants")  # the embedded server's own tenant, `local`, is an operator
    expect(page.locator("body")).to_have_attribute("data-operator", "true")
    expect(page.get_by_role("link", name="Tenants")).to_be_visible()
    create = page.locator("#create-tenant-form")
    create.get_by_label("Tenant name").fill("console-made")
    create.get_by_label("Tokens per minute").fill("5000")
    create.get_by_role("button", name="Create tenant").click()
    first_key = page.get_by_label("First API key")
    expect(first_key).to_have_value(re.compile(r"^tml-"))
    row = page.locator('#tenants-table tr[data-tenant="console-made"] td')
    expect(row.nth(3)).to_have_text(re.compile(r"^5,?000$"))
    expect(row.nth(6)).to_have_text("1")  # live keys: the first one

    page.get_by_role("button", name="Edit limits of console-made").click()
    edit = page.locator("#edit-tenant-form")
    expect(edit.get_by_label("Tokens per minute")).to_have_value("5000")
    edit.get_by_label("Tokens per minute").fill("")  # back to the deployment's default
    edit.get_by_label("Requests per minute").fill("100")
    edit.get_by_role("button", name="Save limits").click()
    expect(row.nth(3)).to_have_text("default")
    expect(row.nth(2)).to_have_text("100")
    expect(page.get_by_role("button", name="Edit limits of console-made")).to_be_focused()  # keyboard stays there
    page.screenshot(path=artifacts / "console-tenants.png", full_page=True)
    shown = httpx.get(f"{server.url}/api/v1/admin/tenants/console-made", headers={"X-API-Key": server.api_key})
    assert shown.json()["limits"] == {"requests_per_minute": 100}

    key = first_key.input_value()
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, key, "/console/tenants")
    expect(page.locator("#whoami")).to_contain_text("console-made")
    expect(page.get_by_text("This page is for operators only")).to_be_visible()
    expect(page.locator("body")).to_have_attribute("data-operator", "false")
    expect(page.get_by_role("link", name="Tenants")).to_be_hidden()
    expect(page.locator("#tenants-admin")).to_be_hidden()


def test_a_key_revoked_in_the_console_fails_its_next_request(
    page: Page, browser: Browser, server: LoomServer, artifacts: Path
) -> None:
    sign_in(page, create_key(server.data_dir, "console-keys"), "/console/keys")
    page.get_by_label("Key name").fill("doomed")
    page.get_by_role("button", name="Create key").click()
    doomed = page.get_by_label("New API key")
    expect(doomed).to_have_value(re.compile(r"^tml-"))
    plaintext = doomed.input_value()
    assert httpx.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": plaintext}).status_code == 200

    other_tab = page.context.new_page()  # a tab signed in with the doomed key
    sign_in(other_tab, plaintext, "/console/keys")
    row = page.locator(f'#keys-table tr[data-key="{plaintext[:12]}"]')
    expect(row).to_contain_text("active")
    row.get_by_role("button", name=re.compile("^Revoke key doomed")).click()
    expect(row).to_contain_text("revoked")
    page.screenshot(path=artifacts / "console-keys.png", full_page=True)
    assert httpx.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": plaintext}).status_code == 401
    other_tab.reload()
    expect(other_tab.locator("#signin-error")).to_have_text(re.compile("invalid or has been revoked"))
    expect(other_tab.get_by_label("API key", exact=True)).to_be_visible()


def test_a_second_tenant_sees_none_of_the_first_tenants_runs(page: Page, server: LoomServer, trainer: Trainer) -> None:
    training = trainer.training
    sign_in(page, trainer.key)
    expect(page.locator(f'tr[data-run="{training.model_id}"]')).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key", exact=True).fill(create_key(server.data_dir, "console-stranger"))
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#whoami")).to_contain_text("console-stranger")
    assert page.locator("#runs-table tbody tr").count() == 0  # nothing of the last key's page is left
    expect(page.get_by_text("No training runs yet.")).to_be_visible()
    expect(page.locator("#runs-table tbody tr")).to_have_count(0)
    status = page.evaluate(
        """async (run) => (await fetch(`/api/v1/training_runs/${run}/metrics`,
            {headers: {"X-API-Key": sessionStorage.getItem("loom.apiKey")}})).status""",
        training.model_id,
    )
    assert status == 404
