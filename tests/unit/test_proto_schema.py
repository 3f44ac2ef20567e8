"""Our hand-written tinker_wire.proto must be wire-identical to the SDK's schema.

The official SDK (tinker==0.38.0, a test dependency) embeds its schema as a
serialized descriptor in ``tinker/proto/tinker_public_pb2.py``. Protobuf's
binary format depends only on field numbers, wire types and labels, so we
compare those (plus enum values, oneof membership and proto3 ``optional``
presence) message by message. Only the package name is meant to differ.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from api.proto import tinker_wire_pb2 as ours

sdk_pb = pytest.importorskip("tinker.proto.tinker_public_pb2")

REPO = Path(__file__).resolve().parents[2]


def _file_proto(module) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)
    return fd


def _strip_pkg(type_name: str, package: str) -> str:
    prefix = f".{package}."
    return type_name[len(prefix) :] if type_name.startswith(prefix) else type_name


def _flatten(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """{qualified name: comparable shape} for every message and enum."""
    out: dict[str, object] = {}
    for enum in fd.enum_type:
        out[f"enum {enum.name}"] = sorted((v.name, v.number) for v in enum.value)

    def walk(msg: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}{msg.name}"
        oneofs = [o.name for o in msg.oneof_decl]
        fields = sorted(
            (
                f.number,
                f.name,
                f.type,
                f.label,
                _strip_pkg(f.type_name, fd.package),
                oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
                f.proto3_optional,
            )
            for f in msg.field
        )
        out[f"message {name}"] = (fields, msg.options.map_entry)
        for nested in msg.nested_type:
            walk(nested, f"{name}.")
        for enum in msg.enum_type:
            out[f"enum {name}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)

    for msg in fd.message_type:
        walk(msg, "")
    return out


def test_schema_matches_sdk_descriptor() -> None:
    theirs = _file_proto(sdk_pb)
    mine = _file_proto(ours)
    assert theirs.syntax == mine.syntax == "proto3"
    assert mine.package != theirs.package  # both load into one descriptor pool
    assert _flatten(mine) == _flatten(theirs)


def test_bytes_interchangeable_for_every_message() -> None:
    """A populated message of each type survives a trip through the other schema."""
    msg = ours.SampleResponse()
    seq = msg.sequences.add()
    seq.stop_reason = ours.STOP_REASON_LENGTH
    seq.tokens = b"\x01\x00\x00\x00"
    seq.logprobs = b""
    msg.prompt_logprobs = b""
    msg.prompt_cache_hit_tokens = 3
    msg.target_prompt_logprobs.dense = b""
    data = msg.SerializeToString()
    theirs = sdk_pb.SampleResponse.FromString(data)
    assert theirs.HasField("prompt_logprobs") and theirs.sequences[0].HasField("logprobs")
    assert theirs.HasField("target_prompt_logprobs")
    assert theirs.SerializeToString() == data


def test_generated_module_is_up_to_date(tmp_path: Path) -> None:
    """api/proto/tinker_wire_pb2.py was generated from the committed .proto."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO / 'api' / 'proto'}",
            f"--descriptor_set_out={out}",
            str(REPO / "api" / "proto" / "tinker_wire.proto"),
        ],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1
    fresh = fds.file[0]
    _clear_json_names(fresh)  # protoc's Python generator drops them too
    embedded = descriptor_pb2.FileDescriptorProto.FromString(ours.DESCRIPTOR.serialized_pb)
    _clear_json_names(embedded)
    assert fresh == embedded, "api/proto/tinker_wire_pb2.py is stale: run scripts/gen_proto.sh"


def _clear_json_names(fd: descriptor_pb2.FileDescriptorProto) -> None:
    def walk(msg: descriptor_pb2.DescriptorProto) -> None:
        for f in msg.field:
            f.ClearField("json_name")
        for nested in msg.nested_type:
            walk(nested)

    for msg in fd.message_type:
        walk(msg)
