"""TopologyRecords takes a record into the topology only if Envoy can take what it becomes; a value it cannot use
is left out, with one error log naming the key and the reason.
"""

from __future__ import annotations

import logging

import pytest

from protos.topology import (
    Application,
    Artifact,
    Deployment,
    Keys,
    ModelVersion,
    ShadowVariant,
    Signature,
    Stage,
    TensorSpec,
    Variant,
)
from xds_control.topology import TopologyRecords

KEYS = Keys("/t/")


def _app(name: str, *stages: list[tuple[str, int]], shadows: tuple[str, ...] = ()) -> bytes:
    """An application record written as etcdctl would: JSON, no schema checks beyond the records' own."""
    built = [
        Stage(
            variants=[Variant(model=m, version=1, weight=w) for m, w in variants],
            shadows=[ShadowVariant(model=s, version=1) for s in shadows],
        )
        for variants in stages
    ]
    return Application(name=name, stages=built).model_dump_json().encode()


def _model_version(name: str, version: int) -> bytes:
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1])
    signature = Signature(inputs=[spec], outputs=[spec])
    record = ModelVersion(name=name, version=version, runtime="python", artifact=artifact, signature=signature)
    return record.model_dump_json().encode()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("paused", _app("paused", [("m", 0)]), "stage 1: variant weights sum to 0"),
        ("later-paused", _app("later-paused", [("m", 100)], [("m", 0), ("n", 0)]), "stage 2: variant weights sum to 0"),
        ("bad?name", _app("bad?name", [("m", 100)]), "name 'bad?name'"),
        ("trailing", _app("trailing", [("m/", 100)]), "model name 'm/'"),
        ("shadowed", _app("shadowed", [("m", 100)], shadows=("s#1",)), "model name 's#1'"),
    ],
)
def test_an_application_envoy_would_refuse_is_left_out_and_logged_once(
    name: str, value: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    records = TopologyRecords(KEYS)
    records.put(KEYS.application("good"), _app("good", [("m", 100)]))
    key = KEYS.application(name)
    records.put(key, value)
    records.put(key, value)  # seen again (a full read after a watch failure): no second log
    assert set(records.topology(1).applications) == {"good"}
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    assert key in errors[0] and reason in errors[0]


def test_a_deployment_of_a_model_name_envoy_would_refuse_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    records = TopologyRecords(KEYS)
    key = KEYS.deployment("m?x", 1)
    records.put(key, Deployment(model="m?x", version=1, replicas=1).model_dump_json().encode())
    assert records.topology(1).deployments == {}
    assert any(key in e and "model name 'm?x'" in e for e in _errors(caplog))
