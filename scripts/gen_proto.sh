#!/usr/bin/env bash
# Regenerate api/proto/tinker_wire_pb2.py (+ .pyi) from api/proto/tinker_wire.proto.
#
# Needs grpcio-tools (a dev dependency). Usage, from anywhere:
#   scripts/gen_proto.sh            # uses $PYTHON, else .venv/bin/python, else python3
#
# protoc stamps the module with a check that the protobuf *runtime* is at least
# the protoc version it came from (7.x for grpcio-tools 1.8x). The module only
# builds descriptors from a serialized FileDescriptorProto, which every runtime
# the project supports (protobuf >= 5.27, see pyproject.toml) can do, so the
# check is removed here to keep the committed file importable on those runtimes.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

"$py" -m grpc_tools.protoc \
  --proto_path=api/proto \
  --python_out=api/proto \
  --pyi_out=api/proto \
  api/proto/tinker_wire.proto

"$py" - api/proto/tinker_wire_pb2.py <<'PY'
import re
import sys

path = sys.argv[1]
src = open(path, encoding="utf-8").read()
src, n = re.subn(
    r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:[^\n]*\n)*?\)\n",
    "# (runtime version check removed by scripts/gen_proto.sh)\n",
    src,
)
src = src.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
src = src.replace(
    "# NO CHECKED-IN PROTOBUF GENCODE\n",
    "# Checked in on purpose; regenerate with scripts/gen_proto.sh.\n",
)
if n != 1:
    sys.exit(f"gen_proto.sh: expected one runtime version check in {path}, found {n}")
open(path, "w", encoding="utf-8").write(src)
PY

echo "wrote api/proto/tinker_wire_pb2.py and api/proto/tinker_wire_pb2.pyi"
