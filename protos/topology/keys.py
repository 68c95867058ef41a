"""The etcd key layout of the desired state (listed in protos/topology/__init__.py), under one prefix."""

from __future__ import annotations

DEFAULT_PREFIX = "/hydro/"


class Keys:
    """Builds and parses etcd keys under one prefix. The only place that knows the key layout."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix

    def model_versions(self, model: str | None = None) -> str:
        return f"{self.prefix}models/" + (f"{model}/" if model else "")

    def model_version(self, model: str, version: int) -> str:
        return f"{self.prefix}models/{model}/{version}"

    def version_counter(self, model: str) -> str:
        """The last version number handed out for ``model`` (plain integer), so deleted numbers are not reused."""
        return f"{self.prefix}version-counters/{model}"

    def deployments(self) -> str:
        return f"{self.prefix}deployments/"

    def deployment(self, model: str, version: int) -> str:
        return f"{self.prefix}deployments/{model}/{version}"

    def applications(self) -> str:
        return f"{self.prefix}applications/"

    def application(self, name: str) -> str:
        return f"{self.prefix}applications/{name}"

    def instances(self, model: str | None = None, version: int | None = None) -> str:
        key = f"{self.prefix}instances/"
        if model is not None:
            key += f"{model}/"
            if version is not None:
                key += f"{version}/"
        return key

    def instance(self, model: str, version: int, instance_id: str) -> str:
        return f"{self.prefix}instances/{model}/{version}/{instance_id}"

    def proxies(self) -> str:
        return f"{self.prefix}proxies/"

    def proxy(self, node_id: str) -> str:
        return f"{self.prefix}proxies/{node_id}"

    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, name: str) -> str:
        return f"{self.prefix}nodes/{name}"

    def replica_statuses(self, model: str | None = None, version: int | None = None) -> str:
        key = f"{self.prefix}replicas/"
        if model is not None:
            key += f"{model}/"
            if version is not None:
                key += f"{version}/"
        return key

    def replica_status(self, model: str, version: int, replica_id: str) -> str:
        return f"{self.prefix}replicas/{model}/{version}/{replica_id}"

    def pipelines(self, app: str | None = None) -> str:
        return f"{self.prefix}pipelines/" + (f"{app}/" if app is not None else "")

    def pipeline(self, app: str, instance_id: str) -> str:
        return f"{self.prefix}pipelines/{app}/{instance_id}"

    def pipeline_statuses(self, app: str | None = None) -> str:
        return f"{self.prefix}pipeline-replicas/" + (f"{app}/" if app is not None else "")

    def pipeline_status(self, app: str, replica_id: str) -> str:
        return f"{self.prefix}pipeline-replicas/{app}/{replica_id}"

    def kind_of(self, key: str) -> str | None:
        """The first path segment after the prefix (``models``, ``instances``...), or None if foreign."""
        if not key.startswith(self.prefix):
            return None
        return key[len(self.prefix) :].split("/", 1)[0]
