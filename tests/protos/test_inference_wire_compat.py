"""protos/inference.proto is wire-compatible with Triton's grpc_service.proto, as shipped inside tritonclient.

Every message we declare must exist in Triton's proto with the same fields (numbers, names, types, cardinality),
so that tritonclient and any other Triton-speaking tool talk to the runtimes unmodified. A few messages of Triton's
model_config.proto (and ModelStatistics) are declared on purpose as subsets: every field we declare must still be
Triton's, and omitted fields are simply absent on the wire.

Our proto is compiled to a descriptor set here instead of importing protos.inference_pb2: both files define the
`inference` package, and protobuf refuses two files defining the same symbols in one process's default pool.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton

ROOT = Path(__file__).resolve().parents[2]

FieldKey = tuple[int, str, int, int, str]

#: Messages we declare with only some of Triton's fields (the signature part of a model config; statistics
#: without memory usage). Every other message must have all of Triton's fields.
SUBSETS = {"ModelConfig", "ModelInput", "ModelOutput", "ModelStatistics"}


def _compile_ours(out: Path) -> descriptor_pb2.FileDescriptorProto:
    descriptor_set = out / "inference.pb"
    argv = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={descriptor_set}"]
    result = subprocess.run([*argv, "protos/inference.proto"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return files.file[0]


def _messages(
    messages: Iterable[descriptor_pb2.DescriptorProto], prefix: str = ""
) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    for message in messages:
        name = f"{prefix}{message.name}"
        found[name] = message
        found.update(_messages(message.nested_type, f"{name}."))
    return found


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[int, FieldKey]:
    return {f.number: (f.number, f.name, f.type, f.label, f.type_name) for f in message.field}


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    return _compile_ours(tmp_path_factory.mktemp("descriptor"))


@pytest.fixture(scope="module")
def theirs() -> descriptor_pb2.FileDescriptorProto:
    # grpc_service.proto and model_config.proto share the `inference` package; one merged file is compared.
    proto = descriptor_pb2.FileDescriptorProto()
    triton.DESCRIPTOR.CopyToProto(proto)
    config = descriptor_pb2.FileDescriptorProto()
    triton_config.DESCRIPTOR.CopyToProto(config)
    proto.message_type.extend(config.message_type)
    proto.enum_type.extend(config.enum_type)
    return proto


def test_same_package(ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto) -> None:
    assert ours.package == theirs.package == "inference"
    assert ours.syntax == "proto3"


def test_every_message_matches_triton(
    ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto
) -> None:
    our_messages, their_messages = _messages(ours.message_type), _messages(theirs.message_type)
    assert "ModelInferRequest.InferInputTensor" in our_messages
    for name, message in our_messages.items():
        assert name in their_messages, f"{name} is not in Triton's grpc_service.proto or model_config.proto"
        our_fields, their_fields = _fields(message), _fields(their_messages[name])
        if name in SUBSETS:
            for number, field in our_fields.items():
                assert their_fields.get(number) == field, f"{name} field {number} differs from Triton's"
            assert not message.oneof_decl, f"{name}: a subset declares no oneof"
        else:
            assert our_fields == their_fields, f"{name} differs from Triton's"
            assert [o.name for o in message.oneof_decl] == [o.name for o in their_messages[name].oneof_decl]


def test_enums_match_triton(
    ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto
) -> None:
    their_enums = {e.name: {v.name: v.number for v in e.value} for e in theirs.enum_type}
    assert [e.name for e in ours.enum_type] == ["DataType"]
    for enum in ours.enum_type:
        assert {v.name: v.number for v in enum.value} == their_enums[enum.name], enum.name


def test_service_methods_match_triton(
    ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto
) -> None:
    (service,) = ours.service
    their_service = {s.name: s for s in theirs.service}[service.name]
    their_methods = {m.name: m for m in their_service.method}
    assert service.name == "GRPCInferenceService"
    assert {m.name for m in service.method} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
    }
    for method in service.method:
        other = their_methods[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert not method.client_streaming and not method.server_streaming
