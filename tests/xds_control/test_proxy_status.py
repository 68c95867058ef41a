"""proxies/ records in a real etcd, written by ProxyStatusWriter while streams come and go and etcd fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aetcd
import pytest

from manager_api.etcd_server import EtcdServer
from protos.topology.keys import Keys
from protos.topology.proxies import ProxyStatus
from xds_control.status import MAX_NACK_CHARS, TRUNCATED_MARKER, ProxyStatusWriter

DEADLINE = 15.0


def _client(server: EtcdServer) -> aetcd.Client:
    host, port = server.endpoint.split(":")
    return aetcd.Client(host=host, port=int(port))


async def _record(client: aetcd.Client, keys: Keys, node_id: str) -> tuple[ProxyStatus | None, int]:
    """The node's record and the id of the lease it hangs on."""
    got = await client.get(keys.proxy(node_id).encode())
    if got is None:
        return None, 0
    return ProxyStatus.model_validate_json(got.value), got.lease


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _running_writer(client: aetcd.Client, keys: Keys, ttl: int) -> AsyncIterator[ProxyStatusWriter]:
    """A started writer with a short batching window (as a busy control plane has), stopped on the way out."""
    writer = ProxyStatusWriter(client, keys, ttl=ttl, interval=0.02)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


def _all_written(client: aetcd.Client, keys: Keys, *nodes: str) -> Callable[[], Awaitable[bool]]:
    """A check for _until: every node in ``nodes`` has a record."""

    async def check() -> bool:
        records = [await _record(client, keys, node) for node in nodes]
        return all(status is not None for status, _ in records)

    return check


@pytest.fixture
async def shared_etcd(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = _client(etcd_server)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def test_a_reconnected_proxy_keeps_its_record_when_its_old_stream_closes(
    shared_etcd: aetcd.Client, etcd_prefix: str
) -> None:
    keys = Keys(etcd_prefix)
    async with _running_writer(shared_etcd, keys, ttl=5) as writer:
        writer.proxy_connected("ingress", "ingress")
        # Envoy reconnects before the server saw its old stream end: the new stream opens, then the old one closes.
        writer.proxy_connected("ingress", "ingress")
        writer.on_stream_closed("ingress")
        writer.on_ack("ingress", "type.googleapis.com/envoy.config.cluster.v3.Cluster", "v2")

        async def acked() -> bool:
            status, _ = await _record(shared_etcd, keys, "ingress")
            return status is not None and status.acked.get("Cluster") == "v2"

        await _until(acked, "the connected proxy's record with its ACK")
        writer.on_stream_closed("ingress")

        async def gone() -> bool:
            return (await _record(shared_etcd, keys, "ingress"))[0] is None

        await _until(gone, "the record removed once its last stream closed")


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[list[EtcdServer]]:
    """An etcd of this test's own, to stop and start again (the session's is shared); the last one is current."""
    servers = [EtcdServer(tmp_path).start()]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def own_client(own_etcd: list[EtcdServer]) -> AsyncIterator[aetcd.Client]:
    """A client of this test's own etcd; it reconnects to the etcd started again on the same port."""
    client = _client(own_etcd[0])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def test_records_move_to_the_new_lease_after_etcd_was_away(
    own_etcd: list[EtcdServer], own_client: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    keys, client = Keys("/hydro/"), own_client
    async with _running_writer(client, keys, ttl=2) as writer:
        writer.proxy_connected("a", "sidecar")
        writer.proxy_connected("b", "sidecar")
        await _until(_all_written(client, keys, "a", "b"), "both records")
        _, lease_before = await _record(client, keys, "a")
        stopped = own_etcd[0]
        stopped.stop()
        caplog.set_level(logging.WARNING, logger="xds_control.status")
        writer.on_ack("a", "type.googleapis.com/envoy.config.cluster.v3.Cluster", "v2")  # only a is dirty
        await _until(_async(lambda: "could not write proxy status" in caplog.text), "a failed write")
        own_etcd.append(EtcdServer(stopped.data_dir, client_port=stopped.client_port).start())

        async def on_one_new_lease() -> bool:
            try:
                (a, lease_a), (b, lease_b) = [await _record(client, keys, node) for node in ("a", "b")]
            except aetcd.exceptions.ConnectionFailedError:
                return False  # the client's channel is still backing off from the outage
            return a is not None and b is not None and lease_a == lease_b != lease_before

        # Without every record moving to the new lease, b stays on the old one, which nobody keeps alive.
        await _until(on_one_new_lease, "both records on the writer's new lease")


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


async def test_a_huge_rejection_message_is_capped_and_blocks_no_record(
    shared_etcd: aetcd.Client, etcd_prefix: str
) -> None:
    keys = Keys(etcd_prefix)
    async with _running_writer(shared_etcd, keys, ttl=5) as writer:
        writer.proxy_connected("big", "ingress")
        writer.proxy_connected("small", "sidecar")
        # Larger than etcd's request limit (1.5 MiB by default): stored whole, no record could be written at all.
        writer.on_nack("big", "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "v3", "x" * 4 * 1024**2)
        await _until(_all_written(shared_etcd, keys, "big", "small"), "both records, the huge rejection's included")
        status, _ = await _record(shared_etcd, keys, "big")
        assert status is not None and status.last_nack is not None
        assert len(status.last_nack) <= MAX_NACK_CHARS
        assert status.last_nack.startswith("RouteConfiguration version v3: xxx")
        assert status.last_nack.endswith(TRUNCATED_MARKER)


async def test_an_etcd_outage_is_retried_with_back_off_and_logged_once(
    own_etcd: list[EtcdServer], own_client: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    keys, client = Keys("/hydro/"), own_client
    caplog.set_level(logging.DEBUG, logger="xds_control.status")
    # The default back-off (0.2 s doubling to 5 s).
    async with _running_writer(client, keys, ttl=2) as writer:
        writer.proxy_connected("a", "sidecar")
        await _until(_all_written(client, keys, "a"), "the record")
        stopped = own_etcd[0]
        stopped.stop()
        writer.on_ack("a", "type.googleapis.com/envoy.config.cluster.v3.Cluster", "v2")

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "write proxy status" in r.getMessage()]

        await _until(_async(lambda: bool(failures())), "a failed write")
        started = time.monotonic()
        # An observation window, not a readiness wait: how often the writer tries while etcd stays away.
        await asyncio.sleep(2.0)
        window = time.monotonic() - started
        attempts = failures()
        assert [r.levelno for r in attempts].count(logging.WARNING) == 1, "one warning per outage"
        # 0.2 + 0.4 + 0.8 s between attempts: about four in two seconds (without back-off: one every interval).
        assert len(attempts) <= 2 + window / 0.2 / 2, [r.getMessage() for r in attempts]

        own_etcd.append(EtcdServer(stopped.data_dir, client_port=stopped.client_port).start())

        async def acked() -> bool:
            try:
                status, _ = await _record(client, keys, "a")
            except aetcd.exceptions.ConnectionFailedError:
                return False  # the client's channel is still backing off from the outage
            return status is not None and status.acked.get("Cluster") == "v2"

        await _until(acked, "the record written after etcd came back")
        await _until(_async(lambda: "written to etcd again" in caplog.text), "the recovery logged")
        assert caplog.text.count("written to etcd again") == 1
