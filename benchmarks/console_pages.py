"""How long the web console's pages take to render for a big tenant: 1,000 runs, 10,000 checkpoints, and one run
with 1,000 plotted steps (issue 14's "no page takes more than a second to render").

The app runs in process under uvicorn (external queue: no model loads) on a SQLite database seeded directly with
rows as the API and workers write them. Debian's chromium (Playwright) opens each page signed in and the clock
stops when the page shows its data: the runs table (newest 100 of 1,000 runs), one run's checkpoint list, the
1,000-step loss chart of a ticked run, the aliases page's checkpoint picker (the newest 1,000 checkpoints), the
usage page (14 days of hourly events, per run and per key), the keys page and the queue page (the tenant's limits).
Same-run baseline: the same page for a tenant with nothing, measured the same way, interleaved. Also printed: the
REST route behind each page, timed through httpx.

Limits: one SQLite file on a local disk (PostgreSQL is not measured); page timings include Chromium's layout on
this machine's 2 shared cores; the checkpoints have database rows only (listing never opens their files). The
operators' tenants page is not timed: neither tenant is an operator, and it lists tenants, not a tenant's data.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import uvicorn
from playwright.sync_api import Page, sync_playwright
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.app import build_state, create_app  # noqa: E402
from api.db.keys import create_api_key  # noqa: E402
from api.db.models import TRAINING_LANE, Checkpoint, ClientSession, Job, JobState, TrainingRun  # noqa: E402
from api.db.types import utcnow  # noqa: E402
from api.deps import AppState  # noqa: E402
from api.usage import hour_of  # noqa: E402
from contract.settings import Settings  # noqa: E402

RUNS, CHECKPOINTS_PER_RUN, STEPS = 1000, 10, 1000
BASE = "loom/tiny-kimi-k2"
TARGET_S = 1.0


def seed(state: AppState, owner: str) -> str:
    """`RUNS` runs in 100 sessions with `CHECKPOINTS_PER_RUN` checkpoints each; the newest run has `STEPS` finished
    forward_backward + optim_step pairs. Returns the newest run's id."""
    now = utcnow()
    sessions = [{"id": f"s{i:03d}", "owner": owner} for i in range(RUNS // 10)]
    runs = [
        {
            "id": f"s{i // 10:03d}:train:{i % 10}",
            "owner": owner,
            "session_id": f"s{i // 10:03d}",
            "model_seq_id": i % 10,
            "base_model": BASE,
            "lora_rank": 8,
            "train_attn": True,
            "train_mlp": True,
            "train_unembed": False,
            "created_at": now - timedelta(seconds=RUNS - i),
            "last_request_time": now - timedelta(seconds=RUNS - i),
        }
        for i in range(RUNS)
    ]
    checkpoints = [
        {
            "run_id": run["id"],
            "owner": owner,
            "checkpoint_id": f"weights/c{j}",
            "kind": "training",
            "tinker_path": f"tinker://{run['id']}/weights/c{j}",
            "storage_uri": f"file:///nowhere/{run['id']}/c{j}",
            "size_bytes": 5_000_000,
            "committed": True,
            "created_at": run["created_at"] + timedelta(milliseconds=j),
        }
        for run in runs
        for j in range(CHECKPOINTS_PER_RUN)
    ]
    newest = runs[-1]["id"]
    jobs = [
        {
            "id": f"job-{seq}",
            "owner": owner,
            "kind": "forward_backward" if seq % 2 else "optim_step",
            "lane": TRAINING_LANE,
            "base_model": BASE,
            "model_id": newest,
            "seq_id": seq,
            "payload": {},
            "state": JobState.DONE.value,
            "result": {"metrics": {"loss:sum": 100.0 / seq}} if seq % 2 else {"metrics": {"grad_norm:mean": 1.0}},
            "cost_tokens": 64 if seq % 2 else 0,
            "finished_at": now - timedelta(seconds=2 * STEPS - seq),
        }
        for seq in range(1, 2 * STEPS + 1)
    ]
    with state.transaction() as session:
        for model, rows in ((ClientSession, sessions), (TrainingRun, runs), (Checkpoint, checkpoints), (Job, jobs)):
            session.execute(insert(model), rows)
    return newest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(state: AppState) -> tuple[uvicorn.Server, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state=state), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def page_actions(run_id: str | None) -> dict[str, Callable[[Page], object]]:
    """Page name -> what opens it and waits until its data is shown (`run_id`: the run to tick, if any)."""

    def runs(page: Page) -> None:
        page.goto("/console/runs")
        page.locator("#runs-table tbody tr, #runs-empty:not([hidden])").first.wait_for()

    def checkpoints(page: Page) -> None:
        runs(page)
        if run_id is None:
            return
        page.get_by_role("button", name=f"Checkpoints of run {run_id}").click()
        page.locator("#checkpoints-table tbody tr").first.wait_for()

    def chart(page: Page) -> None:
        runs(page)
        if run_id is None:
            return
        page.get_by_label(f"Plot run {run_id}").check()
        page.locator(f'figure[data-metric="loss:sum"][data-steps="{STEPS}"]').wait_for()

    def aliases(page: Page) -> None:
        page.goto("/console/aliases")
        page.locator("#aliases-empty:not([hidden])").wait_for()
        if run_id is not None:
            page.locator(f"#alias-target option >> nth={RUNS - 1}").wait_for(state="attached")

    def usage(page: Page) -> None:
        page.goto("/console/usage")
        page.locator("#usage-table tbody tr, #usage-empty:not([hidden])").first.wait_for()

    def keys(page: Page) -> None:
        page.goto("/console/keys")
        page.locator("#keys-table tbody tr").first.wait_for()

    def queue(page: Page) -> None:
        page.goto("/console/queue")
        page.locator("#limits-table tbody tr").first.wait_for()

    return {
        "runs": runs,
        "checkpoints": checkpoints,
        "chart": chart,
        "aliases": aliases,
        "usage": usage,
        "keys": keys,
        "queue": queue,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions per page instead of 5")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as data_dir:
        state = build_state(Settings(data_dir=Path(data_dir), base_models=["tiny-kimi-k2"], queue="external"))
        with state.transaction() as session:
            _, big_key = create_api_key(session, "big", "bench")
            _, empty_key = create_api_key(session, "empty", "bench")
        started = time.perf_counter()
        run_id = seed(state, "big")
        print(
            f"seeded {RUNS} runs, {RUNS * CHECKPOINTS_PER_RUN} checkpoints, {STEPS} steps in "
            f"{time.perf_counter() - started:.1f} s"
        )
        server, url = serve(state)
        end_hour = hour_of(utcnow()) + timedelta(hours=1)  # the usage page's 14 days
        start, end = (f"{hour:%Y-%m-%dT%H:%M:%SZ}" for hour in (end_hour - timedelta(days=14), end_hour))
        routes = {
            "runs": "/api/v1/training_runs?limit=100",
            "checkpoints": f"/api/v1/training_runs/{run_id}/checkpoints",
            "chart": f"/api/v1/training_runs/{run_id}/metrics",
            "aliases": "/api/v1/checkpoints?limit=1000",
            "usage runs": f"/api/v1/billing/usage/runs?starting_on={start}&ending_before={end}",
            "usage report": f"/api/v1/usage/report?start={start}&end={end}&per=window",
        }
        with httpx.Client(base_url=url, headers={"X-API-Key": big_key}, timeout=60) as http:
            for name, route in routes.items():
                times = [timed(lambda route=route: http.get(route).raise_for_status()) for _ in range(reps)]
                print(f"REST {name:12s} {route:60s} median {1000 * statistics.median(times):7.1f} ms")
        tenants = {"big": (big_key, page_actions(run_id)), "empty": (empty_key, page_actions(None))}
        results: dict[str, dict[str, list[float]]] = {"big": {}, "empty": {}}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium)
            for _ in range(reps):
                for tenant, (key, actions) in tenants.items():  # interleaved: big, then the baseline
                    for name, action in actions.items():
                        context = browser.new_context(base_url=url, viewport={"width": 1366, "height": 900})
                        context.add_init_script(f"sessionStorage.setItem('loom.apiKey', {key!r})")
                        page = context.new_page()
                        results[tenant].setdefault(name, []).append(timed(lambda page=page, a=action: a(page)))
                        context.close()
            browser.close()
        server.should_exit = True
    print(f"\n{'page':12s} {'big tenant':>12s} {'empty tenant':>13s} {'ratio':>7s}  target < {TARGET_S:.0f} s")
    for name in results["big"]:
        big, empty = statistics.median(results["big"][name]), statistics.median(results["empty"][name])
        verdict = "met" if big < TARGET_S else "NOT met"
        print(f"{name:12s} {1000 * big:9.0f} ms {1000 * empty:10.0f} ms {big / empty:7.2f}  {verdict}")


if __name__ == "__main__":
    main()
