"""Envoy's own replies (no route, rate limited, too large, timed out...) as Open Inference Protocol errors: JSON
``{"error"}`` for REST, a plain grpc-message with the right grpc-status for gRPC."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import metadata_pb2, value_pb2
from google.protobuf import struct_pb2

from xds_control.resources.core import set_header, text_format
from xds_control.resources.headerless_grpc import FIELD_EXTRACTION_FILTER, NAME_FIELDS
from xds_control.resources.routes import GRPC_MODEL_HEADER, grpc_content_type_matcher

RATE_LIMITED_MESSAGE = (
    "too many requests: the model version's rate limit (policies.rate_limit in its deployment) is exceeded; retry later"
)
GRPC_DEADLINE_EXCEEDED = "4"
GRPC_NOT_FOUND = "5"
GRPC_RESOURCE_EXHAUSTED = "8"
TOO_LARGE_MESSAGE = (
    "request body too large: the model version's policies.max_request_bytes or the mesh's limit "
    "(xds_control --max-request-mb) is exceeded"
)
#: The answer to a gRPC call naming no application or model version the mesh knows (a substitution format:
#: the model name and version come from the field extraction's dynamic metadata, as lists).
UNKNOWN_MODEL_FORMAT = (
    "no application or deployed model version named {model} ({model_field}; {version_field} {version}); "
    "the manager's GET /api/v1/applications lists them"
)
UNKNOWN_HEADER_FORMAT = (
    f"no application named %REQ({GRPC_MODEL_HEADER})% by the {GRPC_MODEL_HEADER} request header; "
    "the manager's GET /api/v1/applications lists them"
)

#: Cluster metadata (namespace, key) saying what a cluster's hosts are, in a user's words: the 503 of a cluster
#: without a ready host names it.
SERVES_METADATA = ("hydro", "serves")
#: Envoy's own words first (clients and tests match "no healthy upstream"), then what has no ready replica.
NO_READY_REPLICA_FORMAT = (
    f"%LOCAL_REPLY_BODY%: no ready replica of %CLUSTER_METADATA({SERVES_METADATA[0]}:{SERVES_METADATA[1]})% "
    "(hydro status shows why)"
)
#: Envoy's response flag for "no healthy upstream host" (a circuit breaker's 503 is UO, a reset UF/UC...).
NO_HEALTHY_UPSTREAM_FLAG = "UH"


def serving(cluster: cluster_pb2.Cluster, what: str) -> cluster_pb2.Cluster:
    """``cluster`` with ``what`` its hosts serve ("model version iris:1") in its metadata, for the 503 it answers
    when none is ready."""
    namespace, key = SERVES_METADATA
    cluster.metadata.filter_metadata[namespace].update({key: what})
    return cluster


def _plain_text() -> substitution_format_string_pb2.SubstitutionFormatString:
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%")
    )


def _status_is(code: int) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"hydro.local_reply.status_{code}"),
            )
        )
    )


def _all_of(*filters: accesslog_pb2.AccessLogFilter) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=list(filters)))


def _extracted(field: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        metadata_filter=accesslog_pb2.MetadataFilter(
            matcher=metadata_pb2.MetadataMatcher(
                filter=FIELD_EXTRACTION_FILTER,
                path=[metadata_pb2.MetadataMatcher.PathSegment(key=field)],
                value=value_pb2.ValueMatcher(present_match=True),
            ),
            match_if_key_not_found={"value": False},
        )
    )


def _no_healthy_upstream() -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=[NO_HEALTHY_UPSTREAM_FLAG])
    )


def _has_header(name: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        header_filter=accesslog_pb2.HeaderFilter(
            header=route_components_pb2.HeaderMatcher(name=name, present_match=True)
        )
    )


def local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own replies speak the Open Inference Protocol: JSON {"error"} for REST, plain grpc-message.

    The policy rejections (429 rate limited, 413 too large) get a message that says which policy refused the
    call, and "no healthy upstream" (503) names what has no ready replica (the chosen cluster's metadata, see
    ``serving``); the first matching mapper wins, so the gRPC variants come first.
    """
    grpc = _content_type_is_grpc_filter()
    no_ready_json = struct_pb2.Struct()
    no_ready_json.update({"error": NO_READY_REPLICA_FORMAT})
    mappers = [
        # Envoy turns the 503 into UNAVAILABLE for gRPC itself.
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _no_healthy_upstream()), body_format_override=text_format(NO_READY_REPLICA_FORMAT)
        ),
        hcm_pb2.ResponseMapper(
            filter=_no_healthy_upstream(),
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                json_format=no_ready_json, content_type="application/json"
            ),
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(429)),
            body=base_pb2.DataSource(inline_string=RATE_LIMITED_MESSAGE),
            body_format_override=_plain_text(),
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(413)),
            body=base_pb2.DataSource(inline_string=TOO_LARGE_MESSAGE),
            body_format_override=_plain_text(),
            headers_to_add=[set_header("grpc-status", GRPC_RESOURCE_EXHAUSTED)],
        ),
        # No route for the model a gRPC call names: NOT_FOUND naming it (Envoy's own mapping of 404 would be
        # UNIMPLEMENTED, which tells a client the method does not exist).
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(404), _has_header(GRPC_MODEL_HEADER)),
            body_format_override=text_format(UNKNOWN_HEADER_FORMAT),
            headers_to_add=[set_header("grpc-status", GRPC_NOT_FOUND)],
        ),
        *(
            hcm_pb2.ResponseMapper(
                filter=_all_of(grpc, _status_is(404), _extracted(model_field)),
                body_format_override=text_format(
                    UNKNOWN_MODEL_FORMAT.format(
                        model=f"%DYNAMIC_METADATA({FIELD_EXTRACTION_FILTER}:{model_field})%",
                        version=f"%DYNAMIC_METADATA({FIELD_EXTRACTION_FILTER}:{version_field})%",
                        model_field=model_field,
                        version_field=version_field,
                    )
                ),
                headers_to_add=[set_header("grpc-status", GRPC_NOT_FOUND)],
            )
            for model_field, version_field in NAME_FIELDS
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(404)),
            body_format_override=_plain_text(),
            headers_to_add=[set_header("grpc-status", GRPC_NOT_FOUND)],
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(504)),
            body_format_override=_plain_text(),
            headers_to_add=[set_header("grpc-status", GRPC_DEADLINE_EXCEEDED)],
        ),
        # The ingress's own health answers ({"live": true}): already OIP JSON, not an error.
        hcm_pb2.ResponseMapper(
            filter=_status_is(200),
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%"),
                content_type="application/json",
            ),
        ),
        hcm_pb2.ResponseMapper(filter=_status_is(429), body=base_pb2.DataSource(inline_string=RATE_LIMITED_MESSAGE)),
        hcm_pb2.ResponseMapper(filter=_status_is(413), body=base_pb2.DataSource(inline_string=TOO_LARGE_MESSAGE)),
        hcm_pb2.ResponseMapper(filter=grpc, body_format_override=_plain_text()),
    ]
    json_body = struct_pb2.Struct()
    json_body.update({"error": "%LOCAL_REPLY_BODY%"})
    return hcm_pb2.LocalReplyConfig(
        mappers=mappers,
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=json_body, content_type="application/json"
        ),
    )


def _content_type_is_grpc_filter() -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(header=grpc_content_type_matcher()))
