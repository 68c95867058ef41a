"""GET /api/v1/events: topology changes as server-sent events from a real manager on its own real etcd.

The module has an etcd of its own: one test compacts its history, and another counts its watchers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import httpx
import pytest
from etcd_metrics import etcd_watchers
from manager_under_test import ManagerUnderTest, register_model

from manager_api.auth import write_token_file
from manager_api.etcd_server import EtcdServer
from manager_api.events import KEEPALIVE, event_stream
from manager_api.processes import wait_until
from manager_api.store.changes import Change
from manager_api.store.topology_store import TopologyStore
from protos.topology.keys import Keys

ADMIN = "events-admin-token"
VIEWER = "events-viewer-token"
PREFIX = "/hydro-events-test/"


@dataclass
class Event:
    id: str | None
    type: str
    data: dict[str, Any]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("events-etcd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def manager(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerUnderTest]:
    data_dir = tmp_path_factory.mktemp("events-manager")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"ops": ("admin", ADMIN), "dashboards": ("viewer", VIEWER)})
    with ManagerUnderTest(etcd.endpoint, PREFIX, data_dir, tokens_file=tokens) as manager:
        yield manager


@pytest.fixture
def admin(manager: ManagerUnderTest) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=manager.api, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
        yield client


@pytest.fixture
def viewer(manager: ManagerUnderTest) -> Iterator[httpx.Client]:
    # The read timeout bounds a wait for the next line; heartbeats (15 s) come sooner when nothing happens.
    with httpx.Client(base_url=manager.api, headers={"authorization": f"Bearer {VIEWER}"}, timeout=30) as client:
        yield client


def read_events(response: httpx.Response, until: Callable[[Event], bool], timeout: float = 20.0) -> list[Event]:
    """Parse SSE from ``response`` until an event satisfies ``until``; every event read, in order."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            break
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if "data" in fields:
            event = Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            events.append(event)
            if until(event):
                return events
        fields = {}
    raise AssertionError(f"no matching event within {timeout} s; got {events}")


def test_a_new_deployment_is_streamed(manager: ManagerUnderTest, admin: httpx.Client, viewer: httpx.Client) -> None:
    register_model(admin, "ev")
    with viewer.stream("GET", "/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        put = admin.put("/deployments/ev/1", json={"replicas": 2})
        assert put.status_code == 200, put.text
        events = read_events(stream, lambda e: e.data["kind"] == "deployment")
    event = events[-1]
    revision = put.json()["revision"]
    assert event.id == str(revision) and event.type == "put"
    assert event.data["key"] == Keys(PREFIX).deployment("ev", 1)
    assert event.data["name"] == "ev/1" and event.data["revision"] == revision
    assert event.data["value"]["replicas"] == 2 and event.data["value"]["model"] == "ev"
    assert all(e.data["kind"] in {"model", "deployment", "application", "instance", "proxy"} for e in events)


def test_deletes_and_registrations_are_streamed(admin: httpx.Client, viewer: httpx.Client) -> None:
    register_model(admin, "ev-del")
    admin.put("/deployments/ev-del/1", json={"replicas": 1})
    with viewer.stream("GET", "/events") as stream:
        version = register_model(admin, "ev-del")
        assert admin.delete("/deployments/ev-del/1").status_code == 204
        events = read_events(stream, lambda e: e.type == "delete")
    # The version counter written with the model version is internal: only the model event is sent.
    assert [(e.type, e.data["kind"], e.data["name"]) for e in events] == [
        ("put", "model", "ev-del/2"),
        ("delete", "deployment", "ev-del/1"),
    ]
    assert events[0].data["revision"] == version["revision"] and events[0].data["value"]["version"] == 2
    assert events[1].data["value"] is None and int(events[1].id or 0) > version["revision"]


def test_resume_with_since_or_last_event_id(admin: httpx.Client, viewer: httpx.Client) -> None:
    register_model(admin, "ev-resume")
    first = admin.put("/deployments/ev-resume/1", json={"replicas": 1}).json()["revision"]
    second = admin.put("/deployments/ev-resume/1", json={"replicas": 2}).json()["revision"]
    third = admin.put("/deployments/ev-resume/1", json={"replicas": 3}).json()["revision"]

    def replayed(**kwargs: Any) -> list[Event]:
        with viewer.stream("GET", "/events", **kwargs) as stream:
            assert stream.status_code == 200, stream.read()
            return read_events(stream, lambda e: e.data["revision"] == third)

    # since=N replays what changed after N: the write at N itself was already seen.
    events = replayed(params={"since": first})
    assert [(e.id, e.data["value"]["replicas"]) for e in events] == [(str(second), 2), (str(third), 3)]
    events = replayed(headers={"last-event-id": str(second)})
    assert [e.data["value"]["replicas"] for e in events] == [3]
    # EventSource reconnects to the same URL with Last-Event-ID: the header is newer than the URL's since.
    events = replayed(params={"since": first}, headers={"last-event-id": str(second)})
    assert [e.data["revision"] for e in events] == [third]


def test_tokens_are_required(manager: ManagerUnderTest) -> None:
    for headers, error in (({}, "missing bearer token"), ({"authorization": "Bearer nope"}, "unknown bearer token")):
        response = httpx.get(f"{manager.api}/events", headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert error in response.json()["error"], response.text


def test_bad_resume_points_are_refused(viewer: httpx.Client) -> None:
    response = viewer.get("/events", params={"since": -1})
    assert response.status_code == 422 and "query.since" in response.json()["error"], response.text
    response = viewer.get("/events", params={"since": "yesterday"})
    assert response.status_code == 422 and "query.since" in response.json()["error"], response.text
    response = viewer.get("/events", headers={"last-event-id": "abc"})
    assert response.status_code == 400 and "Last-Event-ID" in response.json()["error"], response.text


def test_compacted_history_is_a_410(etcd: EtcdServer, admin: httpx.Client, viewer: httpx.Client) -> None:
    register_model(admin, "ev-compact")
    old = admin.put("/deployments/ev-compact/1", json={"replicas": 1}).json()["revision"]
    now = admin.put("/deployments/ev-compact/1", json={"replicas": 2}).json()["revision"]

    async def compact() -> None:
        host, port = etcd.endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.compact(now, physical=True)

    asyncio.run(compact())
    response = viewer.get("/events", params={"since": old - 1})
    assert response.status_code == 410, response.text
    assert f"after revision {old - 1} are compacted" in response.json()["error"]
    # From the compaction point on, history is there.
    with viewer.stream("GET", "/events", params={"since": now - 1}) as stream:
        assert stream.status_code == 200
        assert read_events(stream, lambda e: True)[0].data["revision"] == now


def test_the_watch_is_cancelled_when_the_client_leaves(etcd: EtcdServer, manager: ManagerUnderTest) -> None:
    before = etcd_watchers(etcd)
    clients = [
        httpx.Client(base_url=manager.api, headers={"authorization": f"Bearer {VIEWER}"}, timeout=30) for _ in range(3)
    ]
    streams = [client.stream("GET", "/events") for client in clients]
    try:
        for stream in streams:
            assert stream.__enter__().status_code == 200
        wait_until(lambda: etcd_watchers(etcd) == before + 3, 10, "one etcd watch per open stream")
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        for client in clients:
            client.close()
    wait_until(lambda: etcd_watchers(etcd) == before, 10, "the watches of closed streams cancelled")


async def test_silence_is_filled_with_keepalives(tmp_path: Path) -> None:
    """The heartbeat is 15 s in the manager; the stream itself is driven here with a short one."""
    quiet = asyncio.Event()

    async def no_changes() -> AsyncIterator[Change]:
        await quiet.wait()
        yield Change(type="put", key=f"{PREFIX}applications/late", revision=9, value=b"{}")

    stream = event_stream(no_changes(), Keys(PREFIX), heartbeat=0.05)
    assert await anext(stream) == KEEPALIVE
    assert await anext(stream) == KEEPALIVE
    quiet.set()
    assert (await anext(stream)).startswith("id: 9\nevent: put\ndata: ")
    await stream.aclose()


async def test_a_reader_that_stops_reading_is_cut_off_and_its_watch_closed() -> None:
    """Past ``backlog`` queued changes the stream drops its queue, closes the watch and ends: memory stays bounded
    even for a client that holds the connection and reads nothing, and resuming from the last id it did get
    (Last-Event-ID, a whole revision) loses nothing."""
    feed: asyncio.Queue[Change] = asyncio.Queue()
    watch_closed = asyncio.Event()

    async def watch() -> AsyncIterator[Change]:
        try:
            while True:
                yield await feed.get()
        finally:
            watch_closed.set()

    def transaction(revision: int) -> None:
        for name in ("a", "b"):
            feed.put_nowait(Change(type="put", key=f"{PREFIX}applications/{name}", revision=revision, value=b"{}"))

    stream = event_stream(watch(), Keys(PREFIX), heartbeat=5, backlog=5)
    transaction(1)
    first = await anext(stream)
    assert [line for line in first.splitlines() if line.startswith("id: ")] == ["id: 1", "id: 1"]
    for revision in range(2, 10):  # the reader reads nothing meanwhile
        transaction(revision)
    await asyncio.wait_for(watch_closed.wait(), 10)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_one_transaction_larger_than_the_backlog_is_sent_whole() -> None:
    """Cutting inside one revision would make the client resume before it and be cut again, for ever."""

    async def one_big_transaction() -> AsyncIterator[Change]:
        for index in range(20):
            yield Change(type="put", key=f"{PREFIX}applications/app-{index}", revision=7, value=b"{}")

    stream = event_stream(one_big_transaction(), Keys(PREFIX), heartbeat=5, backlog=5)
    text = "".join([chunk async for chunk in stream])
    assert text.count("id: 7\n") == 20
    names = [json.loads(line[len("data: ") :])["name"] for line in text.splitlines() if line.startswith("data: ")]
    assert names == [f"app-{index}" for index in range(20)], "every change of the transaction, in order"


async def test_closing_the_changes_cancels_the_etcd_watch_at_once(etcd: EtcdServer) -> None:
    """What the cut-off relies on: the store's watch ends when its iterator is closed, before the context exits."""
    before = etcd_watchers(etcd)
    host, port = etcd.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        store = TopologyStore(client, Keys(PREFIX))
        async with store.changes() as changes:
            await asyncio.to_thread(wait_until, lambda: etcd_watchers(etcd) == before + 1, 10, "a watch")
            await changes.aclose()
            await asyncio.to_thread(wait_until, lambda: etcd_watchers(etcd) == before, 10, "the watch cancelled")


async def test_a_reader_that_keeps_up_gets_every_change() -> None:
    """The backlog bounds what waits for the reader, not what it gets over time."""
    many = 50

    async def paced() -> AsyncIterator[Change]:
        for revision in range(1, many + 1):
            await asyncio.sleep(0)  # give the reader its turn, as a network watch does
            yield Change(type="put", key=f"{PREFIX}applications/a", revision=revision, value=b"{}")

    stream = event_stream(paced(), Keys(PREFIX), heartbeat=5, backlog=3)
    text = "".join([chunk async for chunk in stream])
    ids = [line[len("id: ") :] for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [str(revision) for revision in range(1, many + 1)], "each change once, in order"


def test_streams_past_the_limit_are_a_503_until_one_closes(
    etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("events-limit")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"dashboards": ("viewer", VIEWER)})
    limited = ManagerUnderTest(
        etcd.endpoint, PREFIX, data_dir, tokens_file=tokens, extra_args=("--max-event-streams", "2")
    )
    headers = {"authorization": f"Bearer {VIEWER}"}
    with limited, httpx.Client(base_url=limited.api, headers=headers, timeout=30) as client:
        with client.stream("GET", "/events") as first, client.stream("GET", "/events") as second:
            assert (first.status_code, second.status_code) == (200, 200)
            refused = client.get("/events")
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            error = refused.json()["error"]
            assert "too many event streams are open" in error and "--max-event-streams is 2" in error, error
            # A refused stream takes no slot, and neither does one refused for a bad resume point.
            assert client.get("/events", headers={"last-event-id": "x"}).status_code == 400
            assert client.get("/events").status_code == 503
        # Both closed: their slots come back once the manager sees the clients gone.

        def a_stream_opens() -> bool:
            with client.stream("GET", "/events") as again:
                return again.status_code == 200

        wait_until(a_stream_opens, 20, "an event stream after two closed")
        with client.stream("GET", "/events") as third, client.stream("GET", "/events") as fourth:
            assert (third.status_code, fourth.status_code) == (200, 200)
