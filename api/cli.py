"""The `loom` command: the API's own subcommands, and a hand-off to the worker's.

    loom serve [--host H] [--port P]    API + embedded workers; prints the URL and an API key, then logs one JSON
                                        line per request (and per failed one) to stderr (`api/request_log.py`)
    loom migrate                        apply database migrations (alembic upgrade head) and exit
    loom keys create --owner O [--name N] / loom keys list --owner O / loom keys revoke KEY_ID --owner O
    loom tenants list                   every tenant, operator or not, with its own limits (`-`: the default applies)
    loom tenants create NAME [--operator] [LIMITS]   a new tenant; prints its first API key
    loom tenants set NAME [--operator|--no-operator] [LIMITS]   change a tenant (`default` clears a limit)
                                        LIMITS: --requests-per-minute N --tokens-per-minute N --concurrent-runs N
                                        --stored-bytes N
    loom runs [--owner O]               training runs with their checkpoints
    loom settings                       every LOOM_* setting, its current value and what it means
    loom plan --model M --gpu G --gpus N [--rank R] [--tokens T] [--format bf16|fp8|int4] [--json]
                                        capacity plan on paper: per-GPU memory, step time, tenants per worker,
                                        LoRA vs full-parameter RL GPU counts (`contract/capacity_plan.py`)
    loom worker ... / loom gc ...       the worker's commands: this process becomes `loom-worker run ...` /
                                        `loom-worker gc ...` (`worker/cli.py`), so the API never imports worker code

Settings come from the environment (`contract/settings.py`), read once here and passed down. On first `serve`, a
key for owner `local` (an operator: it may manage tenants) is created and its plaintext kept in
`<data dir>/api_key` (mode 0600) so later runs print the same key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sqlalchemy import select

from api.db.audit import SERVER
from api.db.keys import authenticate, create_api_key, list_api_keys, revoke_api_key
from api.db.models import Checkpoint, TrainingRun
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from api.db.tenants import LIMIT_COLUMNS, TenantExists, create_tenant, ensure_tenant, list_tenants, set_limits
from contract.catalogue_file import CatalogueError
from contract.settings import Settings, load_settings

WORKER_COMMANDS = {"worker": "run", "gc": "gc"}
"""`loom` subcommand -> the worker program's subcommand it hands over to."""
ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
"""How `loom keys list` prints times (UTC, to the second)."""
GOMP_SPINCOUNT = "20000"
"""Iterations an idle OpenMP thread spins before it sleeps (tens of microseconds), unless the environment says."""


def _sessions(settings: Settings):
    upgrade_to_head(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def local_api_key(settings: Settings, sessions) -> str:
    """The embedded server's key for owner `local`, created once and remembered in the data dir."""
    key_file = settings.data_dir / "api_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    with sessions.begin() as session:
        if key_file.exists():
            key = key_file.read_text().strip()
            if authenticate(session, key) is not None:
                return key
        _, key = create_api_key(session, "local", "loom serve")
        ensure_tenant(session, "local").operator = True  # whoever runs the server operates it
    key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    return key


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from api.app import build_state, create_app
    from api.request_log import configure_request_logs

    configure_request_logs(settings.access_log)
    state = build_state(settings, progress=lambda msg: print(f"[loom] {msg}", flush=True))
    state.queue.prepare()
    key = local_api_key(settings, state.sessions)
    url = f"http://{args.host}:{args.port}"
    print(f"[loom] database   {_without_password(settings.database_url)}", flush=True)
    print(f"[loom] checkpoints {settings.checkpoint_url}", flush=True)
    print(f"[loom] models     {', '.join(state.catalogue.names)}", flush=True)
    print(f"[loom] serving    {url}", flush=True)
    print(f"[loom] use:       export TINKER_BASE_URL={url} TINKER_API_KEY={key}", flush=True)
    print(f"[loom] console    {url}/console (sign in with that key: an operator's)", flush=True)
    uvicorn.run(create_app(state=state), host=args.host, port=args.port, log_level=args.log_level)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> None:
    upgrade_to_head(settings.database_url)
    print(f"[loom] database at head: {_without_password(settings.database_url)}", flush=True)


def cmd_keys(args: argparse.Namespace, settings: Settings) -> None:
    sessions = _sessions(settings)
    with sessions.begin() as session:
        if args.action == "create":
            record, key = create_api_key(session, args.owner, args.name)
            print(f"{record.id}\t{key}")
        elif args.action == "list":
            for record in list_api_keys(session, args.owner):
                state = "live" if record.revoked_at is None else f"revoked {record.revoked_at:{ISO_SECONDS}}"
                print(f"{record.id}\t{record.prefix}\t{record.name}\t{record.created_at:{ISO_SECONDS}}\t{state}")
        elif not revoke_api_key(session, args.key_id, args.owner, actor=SERVER):
            sys.exit(f"no active key {args.key_id} for owner {args.owner}")


def cmd_tenants(args: argparse.Namespace, settings: Settings) -> None:
    sessions = _sessions(settings)
    with sessions.begin() as session:
        if args.action in ("create", "set"):
            given = {column: getattr(args, column) for column in LIMIT_COLUMNS if getattr(args, column) is not ...}
            try:
                if args.action == "create":
                    create_tenant(session, args.name, args.operator, given)
                    _, key = create_api_key(session, args.name, "first key")
                    print(f"{args.name}\t{key}")
                    return
                tenant = set_limits(session, args.name, given)
                if args.operator is not None:
                    tenant.operator = args.operator
            except (ValueError, TenantExists) as exc:
                sys.exit(str(exc))
        print("tenant\toperator\t" + "\t".join(LIMIT_COLUMNS))
        for tenant in list_tenants(session):
            if args.action == "list" or tenant.name == args.name:
                own = ("-" if value is None else str(value) for value in (getattr(tenant, c) for c in LIMIT_COLUMNS))
                print(f"{tenant.name}\t{'yes' if tenant.operator else 'no'}\t" + "\t".join(own))


def _limit(text: str) -> int | None:
    """A limit on the command line: a positive number, or `default` (the deployment's)."""
    if text == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor `default`") from None


def cmd_runs(args: argparse.Namespace, settings: Settings) -> None:
    sessions = _sessions(settings)
    with sessions.begin() as session:
        query = select(TrainingRun).order_by(TrainingRun.created_at)
        if args.owner:
            query = query.where(TrainingRun.owner == args.owner)
        for run in session.scalars(query):
            print(
                f"{run.id}\t{run.owner}\t{run.base_model}\trank={run.lora_rank}\t{run.status}\tnext_seq={run.next_seq_id}"
            )
            for c in session.scalars(
                select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.ephemeral.is_(False))
            ):
                print(f"    {c.tinker_path}\t{c.size_bytes} bytes")


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def cmd_models(args: argparse.Namespace, settings: Settings) -> None:
    """The catalogue this deployment serves, with each model's size."""
    from contract.catalogue_file import DTYPE_BYTES, served_catalogue

    rows = [("id", "arch", "params", "active", "weights", "dtype", "context", "rank", "chat", "pool", "source")]
    for e in served_catalogue(settings).entries.values():
        weights = f"{e.total_params * DTYPE_BYTES[e.dtype] / 2**30:.2f} GiB"
        source = e.source or "built-in"
        rows.append(
            (e.name, e.arch, _count(e.total_params), _count(e.active_params), weights, e.dtype,
             str(e.max_context_length), str(e.max_lora_rank), e.chat_format, e.pool, source)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def _plan_text(p) -> str:
    """The readable table `loom plan` prints."""
    m, s, rl = p.memory, p.step_time, p.rl
    groups = ", ".join(f"{k} {_count(v)}" for k, v in p.lora_params_by_group.items())
    rows = [
        ("model", f"{p.model}: {_count(p.total_params)} params, {_count(p.active_params)} active"),
        ("worker", f"{p.gpus} x {p.gpu}, base in {p.weight_format} ({_gib(p.base_bytes)})"),
        ("run", f"LoRA rank {p.rank}, {p.expert_lora} expert LoRA: {_count(p.lora_params)} params ({groups})"),
        (
            "step",
            f"{p.tokens:,} tokens, sequences of {p.seq_len:,}, checkpointing {'on' if p.checkpointing else 'off'}",
        ),
        ("", ""),
        ("per GPU: usable", _gib(m.usable)),
        ("  frozen base share", _gib(m.base)),
        ("  one run's LoRA + Adam", _gib(m.lora_run)),
        ("  activations (in use)", _gib(m.activations)),
        ("    with checkpointing", _gib(m.activations_checkpointing)),
        ("    without", _gib(m.activations_no_checkpointing)),
        ("  KV cache", _gib(m.kv_cache)),
        ("  free for tenants", _gib(m.free)),
        ("tenants per worker", str(p.tenants)),
        ("", ""),
        ("step time", f"{s.step:.2f} s ({s.bound}-bound, MFU {p.mfu:.0%})"),
        ("  compute", f"{s.compute:.2f} s ({s.flops:.3g} FLOPs)"),
        ("  communication", f"{s.communication:.2f} s"),
        ("  HBM weight reads", f"{s.hbm:.3f} s"),
        ("", ""),
        ("RL GPUs: LoRA", f"{rl.lora_gpus} ({_gib(rl.lora_bytes)} held)"),
        ("  full-parameter", f"{rl.full_gpus} ({_gib(rl.full_bytes)} held)"),
        ("  ratio", f"{rl.ratio:.3f} (FLOPs ratio {rl.flop_ratio:.2f})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}".rstrip() for k, v in rows]
    return "\n".join([*lines, "", "where the ratio stops holding:", *(f"- {line}" for line in p.limits)])


def cmd_plan(args: argparse.Namespace, settings: Settings) -> None:
    import dataclasses
    import json
    from pathlib import Path

    from contract.capacity_plan import GPUS, PlanInput, plan
    from contract.published_models import CONFIG_DIR

    path = Path(args.model) if args.model.endswith(".json") else CONFIG_DIR / f"{args.model}.json"
    if not path.is_file():
        bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        sys.exit(f"loom plan: no config {args.model!r}; bundled: {', '.join(bundled)}, or a path to a config.json")
    inputs = PlanInput(
        config=json.loads(path.read_text()),
        gpu=GPUS[args.gpu],
        gpus=args.gpus,
        rank=args.rank,
        tokens=args.tokens,
        seq_len=args.seq_len,
        weight_format=args.format,
        expert_lora=args.expert_lora,
        checkpointing=not args.no_checkpointing,
        kv_tokens=args.kv_tokens,
        mfu=args.mfu,
    )
    result = plan(inputs, args.model)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else _plan_text(result))


def cmd_settings(args: argparse.Namespace, settings: Settings) -> None:
    for variable, value, description in settings.describe():
        print(f"{variable}={value}\n    {description}")


def _hand_to_worker(command: str, argv: list[str]) -> None:
    """Become the worker's command-line program (same process id, so signals and exit codes pass through)."""
    os.execv(sys.executable, [sys.executable, "-m", "worker.cli", WORKER_COMMANDS[command], *argv])


def _plan_parser(plan: argparse.ArgumentParser) -> None:
    from contract.capacity_plan import FORMATS, GPUS
    from contract.lora_size import EXPERT_LORA

    plan.add_argument("--model", required=True, help="a bundled config (e.g. kimi-k2-instruct) or a config.json path")
    plan.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs of one worker (one copy of the base)")
    plan.add_argument("--rank", type=int, default=32)
    plan.add_argument("--tokens", type=int, default=32768, help="tokens per training step, all tenants together")
    plan.add_argument("--seq-len", type=int, default=4096)
    plan.add_argument("--format", choices=sorted(FORMATS), default="bf16", help="the frozen base's weight format")
    plan.add_argument("--expert-lora", choices=EXPERT_LORA, default="per-expert")
    plan.add_argument("--no-checkpointing", action="store_true")
    plan.add_argument("--kv-tokens", type=int, default=0, help="sampling KV cache tokens held across the worker")
    plan.add_argument("--mfu", type=float, default=0.2, help="assumed model FLOPs utilisation")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API with embedded workers")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="apply database migrations and exit").set_defaults(func=cmd_migrate)
    keys = sub.add_parser("keys", help="create, list or revoke a tenant's API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--owner", required=True)
    create.add_argument("--name", default="cli")
    listing = keys_sub.add_parser("list", help="id, prefix, name, created, live/revoked; oldest first")
    listing.add_argument("--owner", required=True)
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key_id")
    revoke.add_argument("--owner", required=True)
    keys.set_defaults(func=cmd_keys)
    tenants = sub.add_parser("tenants", help="list, create or change tenants (their limits and operator role)")
    tenants_sub = tenants.add_subparsers(dest="action", required=True)
    tenants_sub.add_parser("list", help="every tenant and its own limits; `-`: the deployment's default applies")
    create = tenants_sub.add_parser("create", help="a new tenant; prints its first API key (shown once)")
    create.add_argument("--operator", action="store_true", help="its keys also manage tenants")
    change = tenants_sub.add_parser("set", help="set or clear (`default`) a tenant's limits; creates the tenant")
    change.add_argument("--operator", action=argparse.BooleanOptionalAction, default=None)
    for tenant_parser in (create, change):
        tenant_parser.add_argument("name")
        for column in LIMIT_COLUMNS:
            tenant_parser.add_argument(f"--{column.replace('_', '-')}", type=_limit, default=..., metavar="N|default")
    tenants.set_defaults(func=cmd_tenants)
    runs = sub.add_parser("runs", help="list training runs and checkpoints")
    runs.add_argument("--owner")
    runs.set_defaults(func=cmd_runs)
    sub.add_parser("settings", help="show every setting").set_defaults(func=cmd_settings)
    sub.add_parser("models", help="list the base models this deployment serves").set_defaults(func=cmd_models)
    _plan_parser(sub.add_parser("plan", help="capacity plan on paper for a model and a cluster"))
    for name in WORKER_COMMANDS:
        sub.add_parser(name, help=f"the worker's command (loom-worker {WORKER_COMMANDS[name]} --help)")
    return parser


def default_openmp_waits() -> None:
    """How long idle OpenMP threads spin, for this process and a worker it hands over to; before torch loads.

    The API and the workers share few cores. OpenMP threads that spin long while waiting (libgomp's default,
    300,000 iterations) starve the other side: several-fold slowdowns on a loaded 2-core box. Threads that sleep at
    once (OMP_WAIT_POLICY=PASSIVE) pay a wake-up per parallel region instead, which made a training pass's small
    LoRA matmuls 3x slower (benchmarks/README.md). A short spin keeps both costs small. An exported
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; the benchmarks set the same default for themselves."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    default_openmp_waits()
    if argv and argv[0] in WORKER_COMMANDS:
        _hand_to_worker(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args, load_settings())
    except CatalogueError as exc:
        raise SystemExit(f"loom: {exc}") from None


if __name__ == "__main__":
    main()
