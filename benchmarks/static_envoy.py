"""A static Envoy bootstrap around resources xds_control builds (one listener, its clusters), for Envoys that
run without a control plane: benchmarks/envoy_tracing_cost.py and tests that check one Envoy's behaviour alone
(tests/tracing/test_collector_tls_rejection.py). No side effects at import: tests import it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from xds_control.bootstrap import TEMPLATES


def as_json(message: Message) -> dict[str, Any]:
    """A resource as bootstrap JSON (field names as in the proto, which Envoy reads)."""
    return MessageToDict(message, preserving_proto_field_name=True)


def static_bootstrap(listener: Message, clusters: Sequence[Message], admin_port: int) -> str:
    """A static bootstrap with one listener and an admin endpoint on loopback; the runtime layer (span batching:
    flush every second) is the sidecar template's, so spans leave as they do in the mesh."""
    # The template's ${placeholders} are not YAML until filled; the runtime layer has none.
    template = re.sub(r"\$\{\w+\}", "0", (TEMPLATES / "sidecar.yaml").read_text())
    runtime = yaml.safe_load(template)["layered_runtime"]
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [as_json(listener)], "clusters": [as_json(c) for c in clusters]},
        "layered_runtime": runtime,
    }
    return json.dumps(config)
