"""Routing gRPC calls by the model their request names, with no header: the ingress's HTTP filters that extract
the model name and version from the request body and then choose the route again, and the per-route configs that
turn them on or off.

The route is chosen on the headers, before the body arrives: the field extraction puts the request's model and
version fields in dynamic metadata, then a short Lua filter clears the route cache so that routes matching that
metadata (xds_control.resources.routes) can be chosen.
"""

from __future__ import annotations

import functools
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.grpc_field_extraction.v3 import config_pb2 as field_extraction_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, descriptor_pb2

from xds_control.resources.type_urls import pack

FIELD_EXTRACTION_FILTER = "envoy.filters.http.grpc_field_extraction"
ROUTE_REFRESH_FILTER = "envoy.filters.http.lua"
#: A second buffer filter, in front of the field extraction: it answers 413 past the mesh's request limit
#: (the extraction's own overflow answer is FAILED_PRECONDITION, which tells a client nothing).
REQUEST_LIMIT_FILTER = "hydro.request_limit"

#: The descriptor set of protos/inference.proto (`make protos`): the field extraction parses requests with it.
#: Read from the file, never from protos.inference_pb2, whose `inference` package clashes with tritonclient's.
INFERENCE_DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "protos" / "inference_descriptor.pb"
GRPC_SERVICE = "inference.GRPCInferenceService"
#: Route metadata (under ROUTE_REFRESH_FILTER) with the request limit of the route's model version(s).
MAX_REQUEST_BYTES_KEY = "max_request_bytes"
#: The OIP methods whose request names a model, and its (model, version) fields. The extraction stores each
#: field in dynamic metadata under its own name, as a list of strings.
MODEL_METHODS: dict[str, tuple[str, str]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelMetadata": ("name", "version"),
    "ModelReady": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
}
#: The (model, version) field pairs of MODEL_METHODS: a route by name exists once per pair.
NAME_FIELDS = (("model_name", "model_version"), ("name", "version"))
#: Runs after the field extraction: re-chooses the route, now that the model name is in the dynamic metadata.
#: The route was chosen on the headers, before the body came, and Envoy keeps it unless a filter clears the
#: route cache. The body reaches the buffer filter after this in one piece, which it does not check, so the
#: new route's max_request_bytes (its metadata) is checked here. Kept this short on purpose: copying the
#: extracted fields into metadata of our own here cost up to 30 % of the ingress's gRPC throughput (noisy).
_ROUTE_REFRESH_LUA = f"""\
function envoy_on_request(handle)
  handle:clearRouteCache()
  local limit = handle:metadata():get("{MAX_REQUEST_BYTES_KEY}")
  if limit ~= nil then
    local body = handle:body()
    if body ~= nil and body:length() > limit then
      handle:respond({{[":status"] = "413"}}, "request body too large")
    end
  end
end
"""


@functools.cache
def _field_extraction_packed() -> any_pb2.Any:
    # Read and parsed once per process: the ingress listener is rebuilt on every topology change.
    return pack(field_extraction_config(INFERENCE_DESCRIPTOR_SET.read_bytes()))


def model_methods(descriptor_set: bytes) -> dict[str, tuple[str, str]]:
    """The MODEL_METHODS the descriptor set's GRPCInferenceService has (Envoy refuses unknown ones)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    present = {
        f"{proto.package}.{service.name}.{method.name}"
        for proto in files.file
        for service in proto.service
        for method in service.method
    }
    return {name: fields for name, fields in MODEL_METHODS.items() if f"{GRPC_SERVICE}.{name}" in present}


def field_extraction_config(descriptor_set: bytes) -> field_extraction_pb2.GrpcFieldExtractionConfig:
    """Put the model and version fields of the gRPC requests that name a model into dynamic metadata."""
    by_method = {}
    for method, (model_field, version_field) in sorted(model_methods(descriptor_set).items()):
        by_method[f"{GRPC_SERVICE}.{method}"] = field_extraction_pb2.FieldExtractions(
            request_field_extractions={
                # Envoy 1.40 stores each field under its own name whatever this says; say so.
                model_field: field_extraction_pb2.RequestFieldValueDisposition(dynamic_metadata=model_field),
                version_field: field_extraction_pb2.RequestFieldValueDisposition(dynamic_metadata=version_field),
            }
        )
    return field_extraction_pb2.GrpcFieldExtractionConfig(
        descriptor_set=base_pb2.DataSource(inline_bytes=descriptor_set), extractions_by_method=by_method
    )


def model_routing_filters(max_request_bytes: int) -> list[hcm_pb2.HttpFilter]:
    """Header-less gRPC routing: extract the model name from the request, then choose the route again.

    The route refresh is disabled by default; only the route a header-less gRPC call lands on before its body
    is read (the gRPC fallback route) enables it. The extraction passes REST and other gRPC methods through
    untouched; routes chosen by the x-hydro-model header disable it, so their bodies are not held.
    """
    return [
        hcm_pb2.HttpFilter(
            name=REQUEST_LIMIT_FILTER,
            typed_config=pack(buffer_pb2.Buffer(max_request_bytes={"value": max_request_bytes})),
            disabled=True,
        ),
        # Envoy cannot enable a disabled filter per route without a per-route config, which this one lacks.
        hcm_pb2.HttpFilter(name=FIELD_EXTRACTION_FILTER, typed_config=_field_extraction_packed()),
        hcm_pb2.HttpFilter(
            name=ROUTE_REFRESH_FILTER,
            typed_config=pack(lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=_ROUTE_REFRESH_LUA))),
            disabled=True,
        ),
    ]


def route_refresh_enabled(max_request_bytes: int) -> dict[str, any_pb2.Any]:
    """Per-filter configs that turn the request limit and the route refresh on for one route."""
    return {
        REQUEST_LIMIT_FILTER: pack(
            buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes={"value": max_request_bytes}))
        ),
        # Lua refuses an empty per-route config.
        ROUTE_REFRESH_FILTER: pack(
            lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=_ROUTE_REFRESH_LUA))
        ),
    }


def field_extraction_disabled() -> dict[str, any_pb2.Any]:
    """The per-filter config that keeps the field extraction off a route (the header already chose it)."""
    return {FIELD_EXTRACTION_FILTER: pack(route_components_pb2.FilterConfig(disabled=True))}
