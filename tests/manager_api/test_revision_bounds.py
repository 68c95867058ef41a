"""Revisions the client sends are etcd revisions (int64): a larger number is a 4xx naming the field, not a 500.

A real etcd and a real manager. ``revision`` of PUT bodies and DELETE queries, ``since`` and ``Last-Event-ID`` of
the event stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from manager_under_test import ManagerUnderTest, register_model

from manager_api.etcd_server import EtcdServer

#: One more than etcd's largest revision (a signed 64-bit integer).
TOO_BIG = 2**63


@pytest.fixture
def http(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[httpx.Client]:
    with (
        ManagerUnderTest(etcd_server.endpoint, etcd_prefix, tmp_path) as manager,
        httpx.Client(base_url=manager.api, timeout=30) as client,
    ):
        register_model(client, "iris")
        assert client.put("/deployments/iris/1", json={"replicas": 0}).status_code == 200
        stages = [{"variants": [{"model": "iris", "version": 1, "weight": 100}]}]
        assert client.put("/applications/app", json={"stages": stages}).status_code == 200
        yield client


def refused(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    assert field in response.json()["error"], response.text


def test_a_revision_beyond_int64_is_refused_naming_it(http: httpx.Client) -> None:
    stages = [{"variants": [{"model": "iris", "version": 1, "weight": 100}]}]
    refused(http.put("/deployments/iris/1", json={"replicas": 1, "revision": TOO_BIG}), 422, "body.revision")
    refused(http.put("/applications/app", json={"stages": stages, "revision": TOO_BIG}), 422, "body.revision")
    for path in ("/deployments/iris/1", "/applications/app", "/models/iris/versions/1"):
        refused(http.delete(path, params={"revision": TOO_BIG}), 422, "query.revision")
    # Nothing was written or deleted.
    assert http.get("/deployments/iris/1").json()["replicas"] == 0
    assert http.get("/applications/app").status_code == 200
    assert http.get("/models/iris/versions/1").status_code == 200


def test_an_event_position_beyond_int64_is_refused_naming_it(http: httpx.Client) -> None:
    refused(http.get("/events", params={"since": TOO_BIG}), 422, "query.since")
    refused(http.get("/events", headers={"last-event-id": str(TOO_BIG)}), 400, "Last-Event-ID")
    # The stream follows on from the next revision, which must be one too.
    refused(http.get("/events", params={"since": TOO_BIG - 1}), 422, "query.since")
    refused(http.get("/events", headers={"last-event-id": str(TOO_BIG - 1)}), 400, "Last-Event-ID")


def test_the_largest_revision_is_still_a_revision(http: httpx.Client) -> None:
    # etcd's own answer for a revision it has not reached: a conflict, not a refusal of the number.
    largest = TOO_BIG - 1
    response = http.put("/deployments/iris/1", json={"replicas": 1, "revision": largest})
    assert response.status_code == 409, response.text
    response = http.delete("/deployments/iris/1", params={"revision": largest})
    assert response.status_code == 409, response.text
    # A revision etcd has not reached yet is waited for: the stream opens.
    with http.stream("GET", "/events", params={"since": largest - 1}) as stream:
        assert stream.status_code == 200
