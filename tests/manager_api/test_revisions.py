"""Optimistic concurrency on the manager API: ``revision`` in every read, conditional writes answered 409.

A real manager process on the session's real etcd; what etcd holds is read from etcd itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from manager_under_test import ManagerUnderTest, etcd_read, register_model

from manager_api.etcd_server import EtcdServer
from protos.topology.keys import Keys


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerUnderTest]:
    with ManagerUnderTest(etcd_server.endpoint, "/hydro-revisions-test/", tmp_path_factory.mktemp("mgr")) as manager:
        yield manager


@pytest.fixture
def http(manager: ManagerUnderTest) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=manager.api, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def model(manager: ManagerUnderTest) -> str:
    """A registered model with two versions, shared by the tests (each uses its own deployments and apps)."""
    with httpx.Client(base_url=manager.api, timeout=30) as client:
        register_model(client, "rev")
        register_model(client, "rev")
    return "rev"


def app_body(weight_v1: int, revision: object = None) -> dict[str, Any]:
    variants = [
        {"model": "rev", "version": 1, "weight": weight_v1},
        {"model": "rev", "version": 2, "weight": 100 - weight_v1},
    ]
    body: dict[str, Any] = {"stages": [{"variants": variants}]}
    if revision is not None:
        body["revision"] = revision
    return body


def stored(manager: ManagerUnderTest, key: str) -> tuple[bytes, int] | None:
    return etcd_read(manager.etcd_endpoint, key)


def present(manager: ManagerUnderTest, key: str) -> tuple[bytes, int]:
    """The value and mod_revision of a key that must exist."""
    found = stored(manager, key)
    assert found is not None, f"{key} is not in etcd"
    return found


def test_reads_carry_the_etcd_mod_revision(manager: ManagerUnderTest, http: httpx.Client, model: str) -> None:
    keys = Keys(manager.prefix)
    put = http.put(f"/deployments/{model}/1", json={"replicas": 1})
    assert put.status_code == 200, put.text
    app = http.put("/applications/rev-read", json=app_body(50))
    assert app.status_code == 200, app.text

    for path, key in (
        (f"/deployments/{model}/1", keys.deployment(model, 1)),
        ("/applications/rev-read", keys.application("rev-read")),
        (f"/models/{model}/versions/1", keys.model_version(model, 1)),
    ):
        revision = http.get(path).json()["revision"]
        assert revision == present(manager, key)[1], path
    # Lists carry it too, record by record.
    assert http.get(f"/deployments/{model}/1").json()["revision"] == put.json()["revision"]
    listed = {d["version"]: d["revision"] for d in http.get("/deployments").json() if d["model"] == model}
    assert listed[1] == put.json()["revision"]
    assert {a["name"]: a["revision"] for a in http.get("/applications").json()}["rev-read"] == app.json()["revision"]
    versions = http.get(f"/models/{model}").json()["versions"]
    assert all(v["revision"] > 0 for v in versions)


def test_a_write_returns_the_revision_a_get_then_shows(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    first = http.put(f"/deployments/{model}/2", json={"replicas": 1}).json()["revision"]
    second = http.put(f"/deployments/{model}/2", json={"replicas": 2, "revision": first})
    assert second.status_code == 200, second.text
    assert second.json()["revision"] > first
    assert second.json()["revision"] == http.get(f"/deployments/{model}/2").json()["revision"]
    assert second.json()["revision"] == present(manager, Keys(manager.prefix).deployment(model, 2))[1]
    assert second.json()["replicas"] == 2
    http.delete(f"/deployments/{model}/2")


def test_a_stale_revision_is_a_409_and_changes_nothing(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    key = Keys(manager.prefix).deployment(model, 1)
    read = http.put(f"/deployments/{model}/1", json={"replicas": 1}).json()["revision"]
    moved = http.put(f"/deployments/{model}/1", json={"replicas": 2}).json()["revision"]
    before = stored(manager, key)

    response = http.put(
        f"/deployments/{model}/1", json={"replicas": 5, "policies": {"timeout_ms": 10}, "revision": read}
    )
    assert response.status_code == 409, response.text
    assert response.json() == {
        "error": f"deployment {model}/1 changed since revision {read} (now {moved}): read it again and retry",
        "current_revision": moved,
    }
    assert stored(manager, key) == before
    assert http.get(f"/deployments/{model}/1").json()["replicas"] == 2

    deleted = http.delete(f"/deployments/{model}/1", params={"revision": read})
    assert deleted.status_code == 409 and deleted.json()["current_revision"] == moved, deleted.text
    assert stored(manager, key) == before
    # With the revision just read, both go through.
    assert http.put(f"/deployments/{model}/1", json={"replicas": 3, "revision": moved}).status_code == 200
    now = http.get(f"/deployments/{model}/1").json()["revision"]
    assert http.delete(f"/deployments/{model}/1", params={"revision": now}).status_code == 204
    assert stored(manager, key) is None
    # Gone: a conditional delete is a 404 like any delete of nothing, a conditional update a 409.
    assert http.delete(f"/deployments/{model}/1", params={"revision": now}).status_code == 404
    gone = http.put(f"/deployments/{model}/1", json={"replicas": 1, "revision": now})
    assert gone.status_code == 409 and gone.json()["current_revision"] == 0
    assert "now deleted" in gone.json()["error"] and stored(manager, key) is None


def test_revision_zero_creates_only(manager: ManagerUnderTest, http: httpx.Client, model: str) -> None:
    created = http.put("/applications/rev-create", json=app_body(100, revision=0))
    assert created.status_code == 200, created.text
    again = http.put("/applications/rev-create", json=app_body(0, revision=0))
    assert again.status_code == 409 and again.json()["current_revision"] == created.json()["revision"], again.text
    assert http.get("/applications/rev-create").json()["stages"][0]["variants"][0]["weight"] == 100
    http.delete("/applications/rev-create")


def test_application_updates_and_deletes_are_conditional(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    key = Keys(manager.prefix).application("rev-app")
    read = http.put("/applications/rev-app", json=app_body(90)).json()["revision"]
    moved = http.put("/applications/rev-app", json=app_body(80, revision=read))
    assert moved.status_code == 200, moved.text
    before = stored(manager, key)

    stale = http.put("/applications/rev-app", json=app_body(10, revision=read))
    assert stale.status_code == 409, stale.text
    assert stale.json() == {
        "error": f"application rev-app changed since revision {read} (now {moved.json()['revision']}): "
        "read it again and retry",
        "current_revision": moved.json()["revision"],
    }
    assert http.delete("/applications/rev-app", params={"revision": read}).status_code == 409
    assert stored(manager, key) == before
    assert http.delete("/applications/rev-app", params={"revision": moved.json()["revision"]}).status_code == 204
    assert stored(manager, key) is None


def test_model_version_delete_is_conditional(manager: ManagerUnderTest, http: httpx.Client) -> None:
    version = register_model(http, "rev-delete")
    key = Keys(manager.prefix).model_version("rev-delete", 1)
    stale = http.delete("/models/rev-delete/versions/1", params={"revision": version["revision"] - 1})
    assert stale.status_code == 409 and stale.json()["current_revision"] == version["revision"], stale.text
    assert stored(manager, key) is not None
    assert http.delete("/models/rev-delete/versions/1", params={"revision": version["revision"]}).status_code == 204
    assert stored(manager, key) is None


def _race(count: int, call: Any) -> list[httpx.Response]:
    """``count`` threads released together, each making ``call(i)``; their responses."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response | None] = [None] * count

    def run(index: int) -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait(timeout=30)
            responses[index] = call(client, index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in responses), "a writer did not finish"
    return [r for r in responses if r is not None]


def test_concurrent_writers_with_one_revision_exactly_one_wins(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    key = Keys(manager.prefix).deployment(model, 2)
    read = http.put(f"/deployments/{model}/2", json={"replicas": 1}).json()["revision"]

    responses = _race(
        8,
        lambda client, i: client.put(
            f"{manager.api}/deployments/{model}/2", json={"replicas": 10 + i, "revision": read}
        ),
    )
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [(r.status_code, r.text) for r in responses]
    assert all(r.status_code == 409 for r in responses if r is not winners[0])
    won = winners[0].json()
    assert all(r.json()["current_revision"] == won["revision"] for r in responses if r is not winners[0])
    value, revision = present(manager, key)
    assert revision == won["revision"] and f'"replicas":{won["replicas"]}'.encode() in value

    # Deletes with one revision: one 204; etcd orders the transactions, so the rest find nothing to delete.
    deletes = _race(
        6, lambda client, i: client.delete(f"{manager.api}/deployments/{model}/2", params={"revision": won["revision"]})
    )
    assert sorted(r.status_code for r in deletes) == [204] + [404] * 5, [r.text for r in deletes]
    assert stored(manager, key) is None


def test_concurrent_application_writers_with_one_revision(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    read = http.put("/applications/rev-race", json=app_body(50)).json()["revision"]
    responses = _race(
        6, lambda client, i: client.put(f"{manager.api}/applications/rev-race", json=app_body(i * 10, revision=read))
    )
    assert sorted(r.status_code for r in responses) == [200] + [409] * 5, [r.text for r in responses]
    http.delete("/applications/rev-race")


@pytest.mark.parametrize("bad", [-1, "12", "abc", 1.5, True, None])
def test_bad_revisions_in_bodies_are_refused(
    manager: ManagerUnderTest, http: httpx.Client, model: str, bad: object
) -> None:
    key = Keys(manager.prefix).deployment(model, 1)
    http.put(f"/deployments/{model}/1", json={"replicas": 1})
    before = stored(manager, key)
    body: dict[str, Any] = {"replicas": 4, "revision": bad}
    if bad is None:
        # null is "no revision" (unconditional), the same as leaving the field out.
        assert http.put(f"/deployments/{model}/1", json=body).status_code == 200
        return
    response = http.put(f"/deployments/{model}/1", json=body)
    assert response.status_code == 422, response.text
    assert "body.revision" in response.json()["error"], response.text
    assert stored(manager, key) == before
    app = http.put("/applications/rev-bad", json=app_body(100, revision=bad))
    assert app.status_code == 422 and "body.revision" in app.json()["error"], app.text
    assert http.get("/applications/rev-bad").status_code == 404


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5"])
def test_bad_revisions_in_queries_are_refused(
    manager: ManagerUnderTest, http: httpx.Client, model: str, bad: str
) -> None:
    key = Keys(manager.prefix).deployment(model, 1)
    http.put(f"/deployments/{model}/1", json={"replicas": 1})
    before = stored(manager, key)
    response = http.delete(f"/deployments/{model}/1", params={"revision": bad})
    assert response.status_code == 422, response.text
    assert "query.revision" in response.json()["error"], response.text
    assert stored(manager, key) == before


def test_openapi_documents_revisions(manager: ManagerUnderTest) -> None:
    spec = httpx.get(f"{manager.url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert "revision" in schemas["DeploymentSpec"]["properties"]
    assert any("revision" in example for example in schemas["DeploymentSpec"]["examples"])
    assert any("revision" in example for example in schemas["ApplicationSpec"]["examples"])
    assert "revision" in schemas["DeploymentView"]["required"]
    put = spec["paths"]["/api/v1/deployments/{model}/{version}"]["put"]
    assert put["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith("RevisionConflictBody")
    delete = spec["paths"]["/api/v1/applications/{name}"]["delete"]
    assert any(p["name"] == "revision" and p["in"] == "query" for p in delete["parameters"])


def test_concurrent_writers_without_a_revision_all_land(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    """Unconditional writes are not refused: a lost race is re-read and re-applied, never a 409 or a 500."""
    http.put(f"/deployments/{model}/1", json={"replicas": 1})
    responses = _race(
        8,
        lambda client, i: client.put(
            f"{manager.api}/deployments/{model}/1",
            json={"replicas": 20 + i, "policies": {"timeout_ms": 1000 + i}},
        ),
    )
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    revisions = sorted(r.json()["revision"] for r in responses)
    assert len(set(revisions)) == 8  # eight distinct writes, one after the other
    final = http.get(f"/deployments/{model}/1").json()
    assert final["revision"] == revisions[-1] == present(manager, Keys(manager.prefix).deployment(model, 1))[1]
    last = next(r.json() for r in responses if r.json()["revision"] == revisions[-1])
    assert (final["replicas"], final["policies"]["timeout_ms"]) == (last["replicas"], last["policies"]["timeout_ms"])


def test_a_concurrent_scale_does_not_undo_a_policy_change(
    manager: ManagerUnderTest, http: httpx.Client, model: str
) -> None:
    """PUTs without policies keep the current ones: read and written in one compare, so none writes back stale ones."""
    http.put(f"/deployments/{model}/1", json={"replicas": 1, "policies": {"timeout_ms": 1000}})
    for _ in range(3):
        responses = _race(
            6,
            lambda client, i: client.put(
                f"{manager.api}/deployments/{model}/1",
                json={"replicas": 5, "policies": {"timeout_ms": 4321}} if i == 0 else {"replicas": 5},
            ),
        )
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        assert http.get(f"/deployments/{model}/1").json()["policies"]["timeout_ms"] == 4321
        http.put(f"/deployments/{model}/1", json={"replicas": 1, "policies": {"timeout_ms": 1000}})
