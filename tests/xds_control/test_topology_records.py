"""TopologyRecords takes a record into the topology only if Envoy can take what it becomes, and its body agrees
with its key; a value it cannot use leaves the key's last good value in place (one error log naming key and reason).
"""

from __future__ import annotations

import logging

import pytest

from protos.topology.applications import Application, ShadowVariant, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec
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


def test_an_invalid_value_keeps_the_last_good_one_until_the_key_is_deleted(caplog: pytest.LogCaptureFixture) -> None:
    records = TopologyRecords(KEYS)
    key = KEYS.application("shop")
    good = _app("shop", [("m", 100)])
    records.put(key, good)
    records.put(key, b'{"schema_version": 1, "name": "shop", "stages": [{"varaints": []}]}')
    assert records.topology(2).applications["shop"] == Application.model_validate_json(good)
    assert any(key in e and "varaints" in e for e in _errors(caplog))

    # One that Envoy would refuse keeps it too.
    records.put(key, _app("shop", [("m", 0)]))
    assert records.topology(3).applications["shop"] == Application.model_validate_json(good)

    better = _app("shop", [("m", 50), ("n", 50)])
    records.put(key, better)
    assert records.topology(4).applications["shop"] == Application.model_validate_json(better)

    records.delete(key)
    assert records.topology(5).applications == {}


def test_a_first_value_that_is_invalid_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    records = TopologyRecords(KEYS)
    key = KEYS.application("shop")
    records.put(key, b"not json")
    assert records.topology(1).applications == {}
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].startswith(f"ignoring {key}: not a valid record:"), errors
    assert "json_invalid" in errors[0] and "left out (no good value of it seen)" in errors[0], errors


def test_a_full_read_keeps_last_good_values_and_drops_keys_that_are_gone() -> None:
    records = TopologyRecords(KEYS)
    shop, gone = KEYS.application("shop"), KEYS.application("gone")
    good = _app("shop", [("m", 100)])
    records.put(shop, good)
    records.put(gone, _app("gone", [("m", 100)]))
    # What a full read finds: shop now holds garbage, gone has been deleted meanwhile.
    records.reload([(shop, b"{")])
    assert records.topology(2).applications == {"shop": Application.model_validate_json(good)}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (KEYS.application("copy"), _app("shop", [("m", 100)])),
        (KEYS.deployment("m", 2), Deployment(model="m", version=1, replicas=1).model_dump_json().encode()),
        (
            KEYS.instance("m", 1, "a"),
            Instance(model="m", version=1, id="b", node="n", address="127.0.0.1", port=1).model_dump_json().encode(),
        ),
        (
            KEYS.pipeline("shop", "a"),
            PipelineInstance(app="other", id="a", node="n", address="127.0.0.1", port=1, spec_digest="d")
            .model_dump_json()
            .encode(),
        ),
        (KEYS.model_version("m", 1), _model_version("m", 2)),
    ],
)
def test_a_record_whose_body_names_another_key_is_left_out(
    key: str, value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    records = TopologyRecords(KEYS)
    shop = _app("shop", [("m", 100)])
    records.put(KEYS.application("shop"), shop)
    records.put(key, value)
    topology = records.topology(1)
    # The key is the record's identity (DESIGN.md): a body naming another one does not stand in for it.
    assert topology.applications == {"shop": Application.model_validate_json(shop)}
    assert topology.deployments == {} and topology.instances == {} and topology.pipelines == {}
    assert topology.models == {}
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].startswith(f"ignoring {key}: its body is the record of "), errors
