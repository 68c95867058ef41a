"""A consistent view of the desired state in etcd (one revision), as the translator needs it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from protos.topology import Application, Deployment, Instance, Keys, ModelVersion

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
    #: time.monotonic() when the first etcd event of this revision's burst arrived (0: not from an event).
    observed_at: float = field(default=0.0, compare=False)

    @classmethod
    def from_kvs(cls, keys: Keys, kvs: Mapping[str, bytes], revision: int, observed_at: float = 0.0) -> Topology:
        """Parse every key under the prefix; a value that does not parse is logged and skipped, never fatal."""
        models: dict[ModelKey, ModelVersion] = {}
        deployments: dict[ModelKey, Deployment] = {}
        applications: dict[str, Application] = {}
        instances: dict[ModelKey, list[Instance]] = {}
        for key, value in kvs.items():
            kind = keys.kind_of(key)
            try:
                if kind == "models":
                    model = ModelVersion.model_validate_json(value)
                    models[(model.name, model.version)] = model
                elif kind == "deployments":
                    deployment = Deployment.model_validate_json(value)
                    deployments[(deployment.model, deployment.version)] = deployment
                elif kind == "applications":
                    app = Application.model_validate_json(value)
                    applications[app.name] = app
                elif kind == "instances":
                    instance = Instance.model_validate_json(value)
                    instances.setdefault((instance.model, instance.version), []).append(instance)
            except ValidationError as exc:
                log.error("ignoring %s: not a valid record: %s", key, exc.errors()[:1])
        return cls(
            revision=revision,
            models=models,
            deployments=deployments,
            applications=applications,
            instances={k: tuple(sorted(v, key=lambda i: i.id)) for k, v in instances.items()},
            observed_at=observed_at,
        )

    def ready_endpoints(self, model: str, version: int) -> list[tuple[str, int]]:
        """Addresses of the sidecars of the ready instances of one model version."""
        return [(i.address, i.port) for i in self.instances.get((model, version), ()) if i.state == "ready"]
