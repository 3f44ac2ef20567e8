"""Round-trip latency of a lone `optim_step`, and one SL step, through a real `loom serve` and the official SDK.

What it measures (all in one run, on this machine, so every figure has a same-run baseline):

1. `optim_step` round trip: starts `loom serve` (SmolLM2-135M-Instruct only) on a free port in a temp data dir,
   creates a LoRA training client with the official `tinker` SDK (rank 8), then times N sequential trivial
   `training.optim_step(AdamParams(...)).result()` calls (no gradients pending, so the engine work is ~0).
   Baseline: N bare HTTP round trips `GET /api/v1/healthz` through one keep-alive `httpx.Client`, interleaved
   one-for-one with the optim steps so machine noise hits both alike. The ratio p50(optim) / p50(healthz)
   is the cost of the Tinker protocol (create request, future, retrieve_future long-poll) plus the queue and
   worker tick, over bare loopback HTTP. A third interleaved row does the same optim_step with raw httpx
   (POST optim_step, then POST retrieve_future until final) on a second run, to split server cost from the
   SDK's own client-side overhead. Round trips over 1 s are counted separately: they are stalls, not load.
   Target: optim_step p50 < 20 ms (SkyRL tx on the reference machine: 116-155 ms, dominated by its 100 ms
   engine DB poll; see /work/shared/reference/skyrl_baseline.md).

2. One SL step (forward_backward + optim_step submitted back to back, then `.result()` on both, as the
   reference bench does) on a fixed batch through the SDK, versus the same step in this process with plain
   transformers + peft (PeftModel, LoRA r=8 alpha=32 on q,k,v,o,gate,up,down, torch AdamW betas 0.9/0.95
   eps 1e-12, summed cross-entropy like Tinker). Batch: 4 sequences x 64 tokens (256 target tokens, weight
   1), matching skyrl_baseline.md (their text is "the opening paragraphs of A Tale of Two Cities"; ours is
   the same book's opening, tokenised locally, so the step-0 loss need not equal their 3.3801 exactly).
   The SDK run uses train_unembed=False so both sides train the same 7 modules. SDK and HF steps alternate
   (SDK step i, HF step i, ...) so load from other processes hits both alike. Medians leave out step 0.
   Reference figures (another machine, Intel Xeon 2 cores): SkyRL tx 2.0-2.13 s/step, HF+PEFT 0.955 s/step.

Limits:
- Loopback only; the client, the API and the embedded worker share the same 2 cores, so the SDK step also
  pays for the client's own serialisation and polling CPU.
- The HF+PEFT baseline runs while the (idle) server process is alive, and the server's weights are resident
  in a second process; the server's CPU time during HF steps is printed so any idle-loop cost is visible.
- No thresholds: nothing fails on a slow result; the target is stated, not asserted.
- Timings on a noisy 2-core machine; compare the ratios, not the absolute numbers, across runs. When other jobs
  oversubscribe the cores, torch's 2 OpenMP threads spinning at barriers run several times slower than 1
  thread. `loom serve` defaults to a short spin (GOMP_SPINCOUNT=20000) for that reason; this script sets the same default
  for itself (an exported value wins, for both sides) and prints it. --threads N pins the thread count of the
  server and the HF baseline alike.

    .venv/bin/python benchmarks/optim_step_roundtrip.py [--quick] [--n 200] [--steps 10] [--seq-len 64] [--threads N]
"""

from __future__ import annotations

import os

# Same OpenMP wait policy as `loom serve` (api/cli.py sets it by default), so the in-process HF baseline and the
# server run under identical torch runtime settings. Must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.server import LoomServer, free_port  # noqa: E402

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Public-domain text (Dickens, A Tale of Two Cities, Book 1 ch. 1), the corpus the reference bench used.
CORPUS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way--in short, the period was so far like the present period, that some of its noisiest authorities "
    "insisted on its being received, for good or for evil, in the superlative degree of comparison only.\n\n"
    "There were a king with a large jaw and a queen with a plain face, on the throne of England; there were a "
    "king with a large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things in general "
    "were settled for ever.\n\n"
    "It was the year of Our Lord one thousand seven hundred and seventy-five. Spiritual revelations were "
    "conceded to England at that favoured period, as at this. Mrs. Southcott had recently attained her "
    "five-and-twentieth blessed birthday, of whom a prophetic private in the Life Guards had heralded the "
    "sublime appearance by announcing that arrangements were made for the swallowing up of London and "
    "Westminster. Even the Cock-lane ghost had been laid only a round dozen of years, after rapping out its "
    "messages, as the spirits of this very year last past (supernaturally deficient in originality) rapped "
    "out theirs. Mere messages in the earthly order of events had lately come to the English Crown and "
    "People, from a congress of British subjects in America: which, strange to relate, have proved more "
    "important to the human race than any communications yet received through any of the chickens of the "
    "Cock-lane brood.\n\n"
    "France, less favoured on the whole as to matters spiritual than her sister of the shield and trident, "
    "rolled with exceeding smoothness down hill, making paper money and spending it."
)


# --------------------------------------------------------------------------------------------------------------
# helpers


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of one process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_batch(seq_len: int, batch: int) -> list[list[int]]:
    """`batch` token sequences of length seq_len+1 from the corpus (tokenised with the served model's tokenizer)."""
    from transformers import AutoTokenizer

    from contract.catalogue import SMOLLM2
    from contract.settings import Settings
    from worker.models.registry import model_dir

    tok = AutoTokenizer.from_pretrained(str(model_dir(SMOLLM2, Settings().model_cache_dir)))
    ids = tok.encode(CORPUS, add_special_tokens=False)
    need = batch * (seq_len + 1)
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * (seq_len + 1) : (i + 1) * (seq_len + 1)] for i in range(batch)]


# --------------------------------------------------------------------------------------------------------------
# measurements


def bench_roundtrips(server: LoomServer, training, raw_model_id: str, n: int, lr: float):
    """Interleaved: bare healthz, raw-protocol optim_step (httpx, second run), SDK optim_step (first run)."""
    from tinker import types

    http = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": server.api_key})
    params = types.AdamParams(learning_rate=lr)
    adam = params.model_dump()
    raw_seq = 0

    def raw_optim() -> None:
        nonlocal raw_seq
        raw_seq += 1
        r = http.post("/api/v1/optim_step", json={"model_id": raw_model_id, "adam_params": adam, "seq_id": raw_seq})
        r.raise_for_status()
        request_id = r.json()["request_id"]
        while True:
            r = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
            r.raise_for_status()
            body = r.json()
            if body.get("type") != "try_again":
                if "error" in body:
                    raise RuntimeError(f"raw optim_step failed: {body}")
                return

    for _ in range(5):  # warm all paths (connections, first-request code paths)
        http.get("/api/v1/healthz").raise_for_status()
        raw_optim()
        training.optim_step(params).result()
    health, raw, optim = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        http.get("/api/v1/healthz").raise_for_status()
        health.append(time.perf_counter() - t)
        t = time.perf_counter()
        raw_optim()
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        training.optim_step(params).result()
        optim.append(time.perf_counter() - t)
    http.close()
    return health, raw, optim


def sdk_batch(seqs: list[list[int]]):
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens=s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in seqs
    ]


def sdk_step(training, data, n_tok: int, lr: float) -> tuple[float, float]:
    """One SL step through the SDK: submit forward_backward and optim_step back to back, then wait on both."""
    from tinker import types

    t = time.perf_counter()
    fb = training.forward_backward(data, "cross_entropy")
    op = training.optim_step(types.AdamParams(learning_rate=lr))
    out = fb.result()
    op.result()
    return time.perf_counter() - t, out.metrics["loss:sum"] / n_tok


class HfPeft:
    """The same step in this process with plain transformers + peft (the user's local loop)."""

    def __init__(self, seqs: list[list[int]], lr: float) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from contract.catalogue import SMOLLM2
        from contract.settings import Settings
        from worker.models.registry import model_dir

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir(SMOLLM2, Settings().model_cache_dir)), dtype=torch.float32, attn_implementation="sdpa"
        )
        self.model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=32,
                lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        self.load_s = time.perf_counter() - t0
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=lr,
            betas=(0.9, 0.95),
            eps=1e-12,
            weight_decay=0.0,
        )
        self.x = torch.tensor([s[:-1] for s in seqs])
        self.y = torch.tensor([s[1:] for s in seqs])

    def step(self) -> tuple[float, float]:
        import torch

        t = time.perf_counter()
        logits = self.model(input_ids=self.x, use_cache=False).logits
        loss_sum = -torch.log_softmax(logits.float(), -1).gather(-1, self.y[..., None])[..., 0].sum()
        loss_sum.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss_sum.detach()) / self.y.numel()


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 round trips, 4 SL steps")
    ap.add_argument("--n", type=int, default=None, help="optim_step round trips (default 200, quick 30)")
    ap.add_argument("--steps", type=int, default=None, help="SL steps per side incl. 1 warm-up (default 10, quick 4)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per datum (4 datums); reference uses 64")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for BOTH the server (OMP_NUM_THREADS) and the in-process HF baseline "
        "(default: torch's default)",
    )
    args = ap.parse_args()
    n = args.n or (30 if args.quick else 200)
    steps = max(2, args.steps or (4 if args.quick else 10))

    import tinker
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server subprocess

    print(
        f"# optim_step_roundtrip: n={n} sl_steps={steps} batch=4x{args.seq_len} torch_threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} cpus={os.cpu_count()} tinker={tinker.__version__}",
        flush=True,
    )
    seqs = make_batch(args.seq_len, 4)
    load0 = f"{os.getloadavg()[0]:.2f}"

    data_dir = tempfile.TemporaryDirectory(prefix="loom-bench-")
    server = LoomServer(Path(data_dir.name), free_port(), env_extra={"LOOM_BASE_MODELS": SMOL})
    try:
        t = time.perf_counter()
        pid = server.start(timeout=300).process.pid
        print(f"server up in {time.perf_counter() - t:.1f} s at {server.url} (pid {pid})", flush=True)
        service = tinker.ServiceClient(base_url=server.url, api_key=server.api_key)
        t = time.perf_counter()
        training = service.create_lora_training_client(base_model=SMOL, rank=8, seed=0, train_unembed=False).result()
        create_s = time.perf_counter() - t
        print(f"create_lora_training_client: {create_s * 1e3:.0f} ms", flush=True)

        # 1. lone optim_step vs bare HTTP
        cpu0 = proc_cpu_seconds(pid)
        w0 = time.perf_counter()
        raw_run = service.create_lora_training_client(base_model=SMOL, rank=8, seed=1, train_unembed=False).result()
        health, raw, optim = bench_roundtrips(server, training, raw_run.model_id, n, args.lr)
        rt_wall = time.perf_counter() - w0
        rt_cpu = (proc_cpu_seconds(pid) - cpu0) / rt_wall

        # 2. SL step: SDK and in-process HF+PEFT, interleaved step by step so machine noise hits both alike
        hf = HfPeft(seqs, args.lr)
        data, n_tok = sdk_batch(seqs), sum(len(s) - 1 for s in seqs)
        sdk_t, sdk_l, hf_t, hf_l = [], [], [], []
        sdk_cpu = hf_cpu = 0.0
        sdk_wall = hf_wall = 0.0
        for _ in range(steps):
            c0, w0 = proc_cpu_seconds(pid), time.perf_counter()
            t, loss = sdk_step(training, data, n_tok, args.lr)
            sdk_t.append(t), sdk_l.append(loss)
            c1, w1 = proc_cpu_seconds(pid), time.perf_counter()
            t, loss = hf.step()
            hf_t.append(t), hf_l.append(loss)
            c2, w2 = proc_cpu_seconds(pid), time.perf_counter()
            sdk_cpu, sdk_wall = sdk_cpu + c1 - c0, sdk_wall + w1 - w0
            hf_cpu, hf_wall = hf_cpu + c2 - c1, hf_wall + w2 - w1
        sdk_cpu, idle_cpu, hf_load = sdk_cpu / sdk_wall, hf_cpu / hf_wall, hf.load_s
    finally:
        server.stop()
        data_dir.cleanup()

    ms = 1e3
    print()
    print("## 1. lone optim_step round trip vs bare HTTP (interleaved, same run)")
    print(
        f"| {'path':<38} | {'n':>4} | {'p50 ms':>8} | {'p95 ms':>8} | {'mean ms':>8} | {'min ms':>8} | "
        f"{'max ms':>8} | {'>1 s':>4} |"
    )
    print(f"|{'-' * 40}|{'-' * 6}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 6}|")
    for name, xs in (
        ("GET /api/v1/healthz (httpx, baseline)", health),
        ("raw optim_step+retrieve_future (httpx)", raw),
        ("SDK optim_step(...).result()", optim),
    ):
        print(
            f"| {name:<38} | {len(xs):>4} | {pct(xs, 0.5) * ms:>8.2f} | {pct(xs, 0.95) * ms:>8.2f} | "
            f"{statistics.mean(xs) * ms:>8.2f} | {min(xs) * ms:>8.2f} | {max(xs) * ms:>8.1f} | "
            f"{sum(x > 1.0 for x in xs):>4} |"
        )
    print(
        f"ratio optim_step / healthz:  p50 {pct(optim, 0.5) / pct(health, 0.5):.1f}x   "
        f"p95 {pct(optim, 0.95) / pct(health, 0.95):.1f}x   mean {statistics.mean(optim) / statistics.mean(health):.1f}x"
    )
    print(
        f"ratio raw-protocol optim_step / healthz: p50 {pct(raw, 0.5) / pct(health, 0.5):.1f}x;  "
        f"SDK / raw-protocol: p50 {pct(optim, 0.5) / pct(raw, 0.5):.2f}x"
    )
    print(
        f"protocol+queue overhead over bare HTTP, p50: {(pct(optim, 0.5) - pct(health, 0.5)) * ms:.2f} ms "
        f"(server side, raw client: {(pct(raw, 0.5) - pct(health, 0.5)) * ms:.2f} ms)"
    )
    p50 = pct(optim, 0.5) * ms
    print(f"target optim_step p50 < 20 ms: {p50:.2f} ms -> {'met' if p50 < 20 else 'NOT met'}")
    print(f"server CPU during this phase: {rt_cpu:.2f} cores")
    stalls = [(name, sum(x > 1.0 for x in xs)) for name, xs in (("raw", raw), ("SDK", optim))]
    if any(k for _, k in stalls):
        print(
            "round trips over 1 s: "
            + ", ".join(f"{name} {k}/{n}" for name, k in stalls)
            + " (an idle server with a finished job: a missed wake-up waits out the long-poll's re-check interval)"
        )

    print()
    print(f"## 2. SL step (forward_backward + optim_step), batch 4x{args.seq_len} = {4 * args.seq_len} target tokens")
    print("medians leave out step 0 (warm-up)")
    print(
        f"| {'path':<34} | {'median s':>8} | {'p25 s':>7} | {'p75 s':>7} | {'step0 s':>7} | {'tok/s':>7} | {'loss 0 -> last':>17} |"
    )
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 19}|")
    rows = (("in-process HF+PEFT (baseline)", hf_t, hf_l), ("Loom via tinker SDK (loopback)", sdk_t, sdk_l))
    for name, ts, ls in rows:
        rest = ts[1:]
        med = statistics.median(rest)
        print(
            f"| {name:<34} | {med:>8.3f} | {pct(rest, 0.25):>7.3f} | {pct(rest, 0.75):>7.3f} | {ts[0]:>7.3f} | "
            f"{4 * args.seq_len / med:>7.0f} | {ls[0]:>7.4f} -> {ls[-1]:>7.4f} |"
        )
    ratio = statistics.median(sdk_t[1:]) / statistics.median(hf_t[1:])
    print(f"ratio Loom SDK step / in-process HF+PEFT step (median): {ratio:.2f}x")
    print(f"step-0 loss parity (same weights, same batch): Loom {sdk_l[0]:.4f} vs HF {hf_l[0]:.4f}")
    print(
        f"server CPU: {sdk_cpu:.2f} cores during SDK steps, {idle_cpu:.2f} cores (idle) during HF steps "
        f"(HF model load {hf_load:.1f} s, not timed)"
    )
    print(
        f"load average at start / end: {load0} / {os.getloadavg()[0]:.2f} (other processes on this machine add noise)"
    )
    print(
        "reference (skyrl_baseline.md, other machine, 4x64): SkyRL tx 2.00-2.13 s/step, HF+PEFT 0.955 s/step "
        "(ratio 2.1-2.2x); SkyRL lone optim_step p50 116-155 ms"
    )


if __name__ == "__main__":
    main()
