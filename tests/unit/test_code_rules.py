"""The codebase's structural rules, checked on every test run.

- Who may import whom (../shared/DESIGN.md's table): the import-linter contracts in pyproject.toml hold.
- No dead code in the server packages: vulture finds no function, method, class, import or unreachable code that
  nothing in the repository (tests aside: code only tests reach is dead too) uses. Framework entry points (FastAPI
  routes, pydantic validators, SQLAlchemy type hooks, `nn.Module.forward`, the hooks a transformers slow tokenizer
  and `TikTokenConverter` call) are what frameworks call. Data-model fields (ORM columns, pydantic fields) are not
  judged: a schema field is read by a serialiser, not by name.
- Settings: no module reads the environment except `contract/settings.py` and the few listed in `ENV_READERS`,
  each for a reason that is not a Loom setting.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vulture

ROOT = Path(__file__).resolve().parents[2]
SERVER = ("api", "contract", "worker", "gpu_kernels")
USERS = (*SERVER, "client", "benchmarks", "examples", "scripts")
"""Where uses of server code may be (everything but tests)."""
FRAMEWORK_NAMES = [
    "forward",
    "process_bind_param",
    "process_result_value",
    "render",
    "cache_ok",
    # transformers' slow-tokenizer hooks (`PythonBackend`) and `TikTokenConverter`'s rank loader
    "get_vocab",
    "_tokenize",
    "_convert_token_to_id",
    "_convert_id_to_token",
    "convert_tokens_to_string",
    "save_vocabulary",
    "load_tiktoken_bpe",
    # transformers' quantizer hooks (a registered quantizer's load operations and its dequantise op)
    "get_load_operations",
    "_dequantize_one",
]
FRAMEWORK_DECORATORS = [
    "@router.*",
    "@*.exception_handler",
    "@field_validator",
    "@model_validator",
    "@property",
    "@register_quantization_config",
    "@register_quantizer",
]
ENV_READERS = {
    "contract/settings.py": "the settings themselves",
    "api/cli.py": "defaults GOMP_SPINCOUNT for libgomp before torch loads, for itself and the worker it hands to",
    "worker/sharded_base.py": "tells DeepSpeed which accelerator to use (DS_ACCELERATOR) before it is imported",
    "worker/vllm/server.py": "the vLLM child process inherits the worker's environment",
}


def test_import_rules_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_dead_code_in_the_server_packages() -> None:
    scan = vulture.Vulture(ignore_names=FRAMEWORK_NAMES, ignore_decorators=FRAMEWORK_DECORATORS)
    scan.scavenge([str(ROOT / folder) for folder in USERS], exclude=["*_pb2.py"])
    dead = [
        item.get_report(add_size=False)
        for item in scan.get_unused_code(min_confidence=60)
        if item.typ not in ("variable", "attribute")
        and Path(item.filename).resolve().relative_to(ROOT).parts[0] in SERVER
    ]
    assert dead == []


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                return True
    return False


def test_only_the_settings_read_the_environment() -> None:
    readers = set()
    for folder in SERVER:
        for path in (ROOT / folder).rglob("*.py"):
            if _reads_environment(ast.parse(path.read_text(), filename=str(path))):
                readers.add(path.relative_to(ROOT).as_posix())
    assert readers <= set(ENV_READERS), sorted(readers - set(ENV_READERS))
    assert "api/cli.py" in readers  # the scan sees what it should
