"""Scale-out figures: optim_step round trip through Celery, 2 workers vs 1, and resident adapters per worker.

All on this machine in one run, each with a same-run baseline:

1. Round trip of a trivial `optim_step` (no gradients pending) through the official tinker SDK against a
   scaled-out Loom (API with `LOOM_QUEUE=celery`, one `loom worker`, private Redis, PostgreSQL; tiny Kimi K2),
   interleaved one-for-one with bare `GET /api/v1/healthz` round trips (the baseline). Then the same against
   the embedded `loom serve` (in-process queue, SQLite) for the cost of the scale-out path. Target: p50 < 50 ms.
2. Throughput with 32 concurrent training runs (32 SDK clients in threads, each `--steps` SL steps of 2 x 24
   tokens), first with one worker process, then with two (new runs, so placement spreads them): completed steps
   per second, and the ratio. Each worker runs torch with one thread, so two workers can use both cores.
3. Resident adapters: in this process, load the base model (SmolLM2, frozen), then make training runs resident
   one by one (LoRA rank `--rank` on every target, plus Adam moments after one step) and compare the process's
   resident memory with base + n x (bytes of one run's tensors). Prints the ratio at each checkpoint and the
   largest n whose ratio stays <= 1.1.

Limits: loopback only, noisy shared cores — compare ratios, not absolute times. No thresholds.

    .venv/bin/python benchmarks/scaleout.py [--quick] [--n 100] [--steps 4] [--runs 32] [--rank 8] [--max-adapters 128]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import secrets
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import create_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.server import LoomServer, free_port  # noqa: E402
from tests.integration.scaleout import TINY, Cluster, running_cluster, training_client  # noqa: E402

ADMIN_URL = os.environ.get("LOOM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def scratch_database():
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"loom_bench_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def scaled_out(workers: int):
    with scratch_database() as url:
        with running_cluster(
            Path(tempfile.mkdtemp(prefix="loom-scaleout-")), url, LOOM_WORKER_DEAD_SECONDS="15"
        ) as cluster:
            for _ in range(workers):
                cluster.start_worker("train")
            cluster.wait_for_workers(workers)
            yield cluster


def use(url: str, key: str) -> None:
    os.environ["TINKER_BASE_URL"], os.environ["TINKER_API_KEY"] = url, key


# -- 1. round trip ---------------------------------------------------------------------------------------------


def roundtrips(url: str, key: str, n: int) -> tuple[list[float], list[float]]:
    from tinker import types

    use(url, key)
    client = training_client(seed=0)
    http = httpx.Client(base_url=url, timeout=30)
    adam = types.AdamParams(learning_rate=0.0)
    for _ in range(5):  # warm-up
        client.optim_step(adam).result()
        http.get("/api/v1/healthz")
    optim, bare = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get("/api/v1/healthz")
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        client.optim_step(adam).result()
        optim.append(time.perf_counter() - t0)
    return optim, bare


def report_roundtrips(label: str, optim: list[float], bare: list[float]) -> float:
    p50 = statistics.median(optim) * 1000
    p95 = statistics.quantiles(optim, n=20, method="inclusive")[18] * 1000
    print(
        f"{label:<28} optim_step p50 {p50:7.1f} ms  p95 {p95:7.1f} ms   "
        f"healthz p50 {statistics.median(bare) * 1000:6.1f} ms   ratio {statistics.median(optim) / statistics.median(bare):5.1f}x"
    )
    return p50


# -- 2. throughput ---------------------------------------------------------------------------------------------


def throughput(cluster: Cluster, runs: int, steps: int, seed0: int) -> float:
    from tinker import types

    from tests.integration.scaleout import datum

    use(cluster.api.url, cluster.api.api_key)
    clients = [training_client(seed0 + i) for i in range(runs)]
    adam = types.AdamParams(learning_rate=1e-3)
    start = threading.Barrier(runs + 1)
    errors: list[BaseException] = []

    def loop(client) -> None:
        try:
            client.forward_backward([datum(0), datum(1)], "cross_entropy").result()  # warm: placed and resident
            client.optim_step(adam).result()
            start.wait()
            for step in range(steps):
                fb = client.forward_backward([datum(2 * step), datum(2 * step + 1)], "cross_entropy")
                client.optim_step(adam).result()
                fb.result()
        except BaseException as exc:  # reported below; the benchmark must not hang on a failed client
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    placed = {cluster.placement(c.model_id) for c in clients}
    print(
        f"  {runs} runs x {steps} steps on {len(placed)} worker(s): {elapsed:.1f} s, {runs * steps / elapsed:.2f} steps/s"
    )
    return runs * steps / elapsed


# -- 3. resident adapters --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def adapter_capacity(rank: int, max_adapters: int) -> None:
    import gc

    import torch

    from contract.catalogue import SMOLLM2
    from contract.settings import Settings
    from loom.types import AdamParams
    from worker.adapter_pool import AdapterPool
    from worker.lora.adapter import LoraSpec
    from worker.models.loader import load_base_model

    torch.set_num_threads(1)
    lm = load_base_model(SMOLLM2, Settings().model_cache_dir)
    pool = AdapterPool(lm)
    gc.collect()
    base = rss_bytes()
    per_run = None
    best = 0
    checkpoints = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_adapters}
    print(f"  base model resident: {base / 2**20:.0f} MiB (SmolLM2, rank {rank}, all targets)")
    for n in range(1, max_adapters + 1):
        run = pool.create_run(f"run-{n}", LoraSpec(rank, n, True, True, True))
        params = [t for pair in run.adapter.params.values() for t in pair]
        for t in params:  # one Adam step allocates the moments, as a trained run has them (it frees the grads)
            t.grad = torch.ones_like(t)
        run.optimizer.step(AdamParams(learning_rate=1e-4))
        if per_run is None:
            per_run = sum(t.numel() * t.element_size() for t in params) * 3  # weights + 2 Adam moments
        gc.collect()
        ratio = (rss_bytes() - base) / (n * per_run)
        if ratio <= 1.1:
            best = n
        if n in checkpoints:
            print(
                f"  {n:4d} resident runs: +{(rss_bytes() - base) / 2**20:8.1f} MiB  expected {n * per_run / 2**20:8.1f} MiB  ratio {ratio:.3f}"
            )
    print(
        f"  one run = {per_run / 2**20:.1f} MiB (LoRA weights + Adam moments); largest n with RSS <= base + n x run x 1.1: {best} of {max_adapters} tried"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n=40, runs=16, steps=2, 64 adapters")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-adapters", type=int, default=128)
    args = parser.parse_args()
    if args.quick:
        args.n, args.runs, args.steps, args.max_adapters = 40, 16, 2, 64

    print("1. optim_step round trip (tinker SDK), interleaved with healthz")
    with scaled_out(workers=1) as cluster:
        celery = report_roundtrips(
            "celery + PostgreSQL + Redis", *roundtrips(cluster.api.url, cluster.api.api_key, args.n)
        )
    folder = Path(tempfile.mkdtemp(prefix="loom-embedded-"))
    server = LoomServer(folder, free_port(), env_extra={"LOOM_BASE_MODELS": TINY}).start()
    try:
        embedded = report_roundtrips("embedded (SQLite)", *roundtrips(server.url, server.api_key, args.n))
    finally:
        server.stop()
    print(f"  celery / embedded p50: {celery / embedded:.2f}x   (target: celery p50 < 50 ms)")

    print(f"2. throughput, {args.runs} concurrent runs")
    with scaled_out(workers=1) as cluster:
        one = throughput(cluster, args.runs, args.steps, seed0=0)
    with scaled_out(workers=2) as cluster:
        two = throughput(cluster, args.runs, args.steps, seed0=100)
    print(f"  2 workers / 1 worker: {two / one:.2f}x")

    print("3. resident adapters in one worker")
    adapter_capacity(args.rank, args.max_adapters)


if __name__ == "__main__":
    main()
