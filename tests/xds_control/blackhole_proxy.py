"""A TCP proxy that can silently stop carrying the connections it has: a dead network path, as a partition or a
lost route leaves it (no RST, no FIN; what is sent is never answered). New connections are carried as usual."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class BlackholeProxy:
    """Listens on a free loopback port and forwards each connection to ``target``; ``blackhole()`` drops
    everything the connections open at that moment carry, in both directions, for as long as they live."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._dead: set[int] = set()  # ids of the connection pairs that carry nothing any more
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._pairs = 0
        self._threads[0].start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blackhole(self) -> int:
        """Stop carrying every connection open now; returns how many there were."""
        with self._lock:
            self._dead.update(range(self._pairs))
            return self._pairs

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                pair = self._pairs
                self._pairs += 1
                self._sockets += [client, upstream]
                threads = [
                    threading.Thread(target=self._pump, args=(pair, client, upstream), daemon=True),
                    threading.Thread(target=self._pump, args=(pair, upstream, client), daemon=True),
                ]
                self._threads += threads
            for thread in threads:
                thread.start()

    def _pump(self, pair: int, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                if pair not in self._dead:
                    sink.shutdown(socket.SHUT_WR)
                return
            if pair in self._dead:
                continue  # read and dropped: the sender's kernel sees it taken, nothing ever arrives
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> BlackholeProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
