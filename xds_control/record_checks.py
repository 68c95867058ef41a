"""Whether a parsed etcd record can go into the topology: what Envoy would refuse, and bodies that disagree with keys.

The manager validates what it writes, but etcd takes anything (etcdctl, a deployer bug). A record that is valid
JSON of its schema can still become configuration Envoy rejects, and Envoy rejects a whole response for one bad
resource: one such record would stop every route or endpoint update of every proxy that gets it. Each check
returns why the record cannot be used (None: it can), so the caller can leave that one key out and log it.
"""

from __future__ import annotations

import ipaddress

from protos.topology.applications import Application
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.models import ModelVersion
from protos.topology.names import is_valid_name

TopologyRecord = ModelVersion | Deployment | Application | Instance | PipelineInstance


def record_problem(keys: Keys, key: str, record: TopologyRecord) -> str | None:
    """Why ``record``, stored at ``key``, cannot go into the topology; None when it can."""
    problem = _key_problem(keys, key, record)
    if problem is not None:
        return problem
    if isinstance(record, Application):
        return application_problem(record)
    if isinstance(record, Deployment):
        return _name_problem("model name", record.model)
    if isinstance(record, Instance | PipelineInstance):
        return endpoint_problem(record.address, record.port)
    return None


def _key_problem(keys: Keys, key: str, record: TopologyRecord) -> str | None:
    # The key is the record's identity (DESIGN.md's etcd schema): the topology is indexed by the names in the
    # body, so a body naming another record would stand in for that one (and vanish with the wrong key).
    if isinstance(record, ModelVersion):
        expected = keys.model_version(record.name, record.version)
    elif isinstance(record, Deployment):
        expected = keys.deployment(record.model, record.version)
    elif isinstance(record, Application):
        expected = keys.application(record.name)
    elif isinstance(record, Instance):
        expected = keys.instance(record.model, record.version, record.id)
    else:
        expected = keys.pipeline(record.app, record.id)
    if expected != key:
        return f"its body is the record of {expected}, not of this key"
    return None


def _name_problem(what: str, name: str) -> str | None:
    # Names go into route paths (/v2/models/{name}), cluster names and headers. Envoy refuses some characters
    # ('?', '#', a trailing '/', control characters, an empty name); the manager's own name rule excludes them all.
    if not is_valid_name(name):
        return f"{what} {name!r} is not a valid name (lower-case letters, digits, '-', '_' and '.', 1 to 63)"
    return None


def application_problem(app: Application) -> str | None:
    """Why Envoy would refuse the routes of ``app`` (ingress or pipeline sidecar); None when it would not."""
    problem = _name_problem("name", app.name)
    if problem is not None:
        return problem
    for index, stage in enumerate(app.stages, start=1):
        # Zero-weight variants are left out of a route; with none left Envoy refuses an empty weighted_clusters.
        if sum(v.weight for v in stage.variants) == 0:
            return f"stage {index}: variant weights sum to 0"
        for model in [v.model for v in stage.variants] + [s.model for s in stage.shadows]:
            problem = _name_problem(f"stage {index}: model name", model)
            if problem is not None:
                return problem
    return None


def endpoint_problem(address: str, port: int) -> str | None:
    """Why an endpoint record cannot go into EDS; None when it can.

    The schema takes any string and integer, but Envoy rejects a whole EDS response for one host name (EDS takes
    IP addresses only) and protobuf refuses a port outside uint32.
    """
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"address {address!r} is not an IP address"
    if not 0 < port < 65536:
        return f"port {port} is not between 1 and 65535"
    return None
