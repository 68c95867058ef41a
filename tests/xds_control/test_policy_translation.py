"""Translation of deployment policies into Envoy resources, without Envoy (the Envoy side is
test_traffic_policies.py)."""

from __future__ import annotations

from protos.topology.policies import Policies
from xds_control.resources.request_limits import RATE_LIMIT_FILTER
from xds_control.resources.routes import model_version_route, retry_policy
from xds_control.translate import request_limits, route_policies


def test_variants_merge_towards_the_most_permissive_route_policy() -> None:
    strict = Policies.model_validate(
        {"timeout_ms": 1000, "retries": {"attempts": 1, "per_try_timeout_ms": 300, "retry_on": ["5xx"]}}
    )
    lenient = Policies.model_validate({"timeout_ms": 4000, "retries": {"attempts": 3, "retry_on": ["unavailable"]}})
    merged = route_policies([strict, lenient])
    assert merged.timeout_ms == 4000
    assert merged.retries is not None
    assert merged.retries.attempts == 3
    assert merged.retries.per_try_timeout_ms is None, "one variant lets a try use the whole timeout"
    assert merged.retries.retry_on == ["5xx", "unavailable"]


def test_no_retries_means_no_retry_policy() -> None:
    off = Policies.model_validate({"retries": {"attempts": 0}})
    policies = route_policies([off, off])
    assert policies.retries is None
    route = model_version_route("m", 1, "model|m|1", policies)
    assert not route.route.HasField("retry_policy")
    assert route.route.timeout.ToMilliseconds() == 60_000


def test_request_limits_only_when_set() -> None:
    assert request_limits("m", 1, Policies()) is None
    limits = request_limits("my.model", 3, Policies.model_validate({"rate_limit": {"requests_per_second": 5}}))
    assert limits is not None
    assert limits.stat_prefix == "model_my_model_3", "dots would split the stat name"
    config = limits.filter_configs()
    assert set(config) == {RATE_LIMIT_FILTER}
    route = model_version_route("m", 1, "model|m|1", route_policies([Policies()]), limits)
    assert set(route.typed_per_filter_config) == {RATE_LIMIT_FILTER}


def test_per_try_timeout_reaches_the_retry_policy() -> None:
    policies = Policies.model_validate({"retries": {"attempts": 2, "per_try_timeout_ms": 250}})
    retry = retry_policy(policies.retries)
    assert retry is not None
    assert retry.per_try_timeout.ToMilliseconds() == 250
    assert retry.num_retries.value == 2
    assert [p.name for p in retry.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
