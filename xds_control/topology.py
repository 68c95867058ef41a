"""A consistent view of the desired state in etcd (one revision), as the translator needs it."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from protos.topology.applications import Application
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.models import ModelVersion
from xds_control.record_checks import TopologyRecord, record_problem

log = logging.getLogger(__name__)

ModelKey = tuple[str, int]


@dataclass(frozen=True)
class Topology:
    """Models, deployments, applications and ready instances at one etcd revision."""

    revision: int = 0
    models: Mapping[ModelKey, ModelVersion] = field(default_factory=dict)
    deployments: Mapping[ModelKey, Deployment] = field(default_factory=dict)
    applications: Mapping[str, Application] = field(default_factory=dict)
    instances: Mapping[ModelKey, tuple[Instance, ...]] = field(default_factory=dict)
    #: Pipeline runtimes by application (``pipelines/``), sorted by id.
    pipelines: Mapping[str, tuple[PipelineInstance, ...]] = field(default_factory=dict)
    #: time.monotonic() when the first etcd event of this revision's burst arrived (0: not from an event).
    observed_at: float = field(default=0.0, compare=False)
    #: W3C traceparents of the manager writes this revision publishes, oldest first (the ``trace_context`` of
    #: the records changed since the previous topology; xds_control.push_spans links its pushes to them).
    writes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_kvs(cls, keys: Keys, kvs: Mapping[str, bytes], revision: int, observed_at: float = 0.0) -> Topology:
        """Parse every key under the prefix; a value that cannot be used is logged and skipped, never fatal."""
        records = TopologyRecords(keys)
        records.reload(kvs.items())
        return records.topology(revision, observed_at)

    def ready_endpoints(self, model: str, version: int) -> list[tuple[str, int]]:
        """Addresses of the sidecars of the ready instances of one model version."""
        return [(i.address, i.port) for i in self.instances.get((model, version), ()) if i.state == "ready"]

    def ready_pipelines(self, app: str) -> list[tuple[str, int]]:
        """Addresses of the sidecars of an application's ready pipeline runtimes."""
        return [(p.address, p.port) for p in self.pipelines.get(app, ()) if p.state == "ready"]


#: The schema of each kind of key the topology is made of.
_SCHEMAS: dict[str, type[TopologyRecord]] = {
    "models": ModelVersion,
    "deployments": Deployment,
    "applications": Application,
    "instances": Instance,
    "pipelines": PipelineInstance,
}

#: Most write trace contexts kept between two topologies (the newest): links beyond these say nothing more.
MAX_WRITES = 64


class TopologyRecords:
    """Parsed records by etcd key, updated one event at a time.

    Parsing is the costly part of reading the state (pydantic validation of every value); keeping the parsed
    records means a change to one key costs one parse, and a Topology is assembled from them without any.

    A value that cannot be used (it does not parse, or Envoy would refuse what it becomes: record_checks) leaves
    the key's last good value in place, so a typo written with etcdctl never takes a working application (or
    endpoint) away; the key's record goes only when the key is deleted. A key whose first value is unusable has
    no last good value: it is left out until a usable one comes. Each unusable value is logged once.
    """

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._models: dict[str, ModelVersion] = {}
        self._deployments: dict[str, Deployment] = {}
        self._applications: dict[str, Application] = {}
        self._instances: dict[str, Instance] = {}
        self._pipelines: dict[str, PipelineInstance] = {}
        self._writes: deque[str] = deque(maxlen=MAX_WRITES)
        #: The unusable value each key holds (logged already), so reading it again does not log it again.
        self._unusable: dict[str, bytes] = {}
        #: The records of each kind of key (the kinds of _SCHEMAS), by key.
        self._by_kind: dict[str, dict[str, Any]] = {
            "models": self._models,
            "deployments": self._deployments,
            "applications": self._applications,
            "instances": self._instances,
            "pipelines": self._pipelines,
        }

    def _all(self) -> tuple[dict[str, Any], ...]:
        return tuple(self._by_kind.values())

    def reload(self, kvs: Iterable[tuple[str, bytes]]) -> None:
        """Take a full read of the state: every (key, value) is put, every key not among them is deleted."""
        seen = set()
        for key, value in kvs:
            seen.add(key)
            self.put(key, value)
        for key in {k for records in (*self._all(), self._unusable) for k in records} - seen:
            self.delete(key)

    def put(self, key: str, value: bytes) -> None:
        """Parse and keep one value; an unusable one is logged and leaves the key's last good value."""
        kind = self._keys.kind_of(key) or ""
        schema = _SCHEMAS.get(kind)
        if schema is None:
            return  # a key of the prefix that is no part of the topology (proxies/, nodes/, replicas/...)
        try:
            record = schema.model_validate_json(value)
        except ValidationError as exc:
            self._unusable_value(key, value, f"not a valid record: {exc.errors()[:1]}")
            return
        problem = record_problem(self._keys, key, record)
        if problem is not None:
            self._unusable_value(key, value, problem)
            return
        self._unusable.pop(key, None)
        self._by_kind[kind][key] = record
        if isinstance(record, Deployment | Application) and record.trace_context:
            self._writes.append(record.trace_context)

    def _unusable_value(self, key: str, value: bytes, reason: str) -> None:
        if self._unusable.get(key) == value:
            return
        self._unusable[key] = value
        kept = any(key in records for records in self._all())
        outcome = "its last good value stays" if kept else "left out (no good value of it seen)"
        log.error("ignoring %s: %s; %s", key, reason, outcome)

    def take_writes(self) -> tuple[str, ...]:
        """The trace contexts of the records put since the last call, oldest first; forgets them."""
        writes = tuple(self._writes)
        self._writes.clear()
        return writes

    def delete(self, key: str) -> None:
        """Forget the key's record (and its unusable value, if it held one)."""
        for records in self._all():
            records.pop(key, None)
        self._unusable.pop(key, None)

    def topology(self, revision: int, observed_at: float = 0.0, writes: tuple[str, ...] = ()) -> Topology:
        """The records as one Topology (no parsing: only the indexes are built); ``writes`` as given."""
        instances: dict[ModelKey, list[Instance]] = {}
        for instance in self._instances.values():
            instances.setdefault((instance.model, instance.version), []).append(instance)
        pipelines: dict[str, list[PipelineInstance]] = {}
        for pipeline in self._pipelines.values():
            pipelines.setdefault(pipeline.app, []).append(pipeline)
        return Topology(
            revision=revision,
            models={(m.name, m.version): m for m in self._models.values()},
            deployments={(d.model, d.version): d for d in self._deployments.values()},
            applications={a.name: a for a in self._applications.values()},
            instances={k: tuple(sorted(v, key=lambda i: i.id)) for k, v in instances.items()},
            pipelines={k: tuple(sorted(v, key=lambda p: p.id)) for k, v in pipelines.items()},
            observed_at=observed_at,
            writes=writes,
        )
