"""A TCP proxy on 127.0.0.1 whose connections a test can cut, as a network that drops them would.

    with TcpProxy(stack.target) as proxy:
        client = SwarmClient(proxy.address)
        ...
        proxy.cut()  # every open connection is reset; new ones are forwarded as before
        proxy.cut(refuse=True)  # ... and new ones are reset too, until proxy.heal()

It runs in threads, so sync and async tests and subprocesses can go through it alike.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import Self


class TcpProxy:
    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.accepted = 0  # connections taken, the cut ones included
        self.cuts = 0
        self.refusing = False
        self._closed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        self._listener.close()
        self._reset_all()

    def cut(self, *, refuse: bool = False) -> int:
        """Resets every open connection, both the client's side and the server's; returns how many.
        With `refuse`, new connections are reset as they come, as from a host cut off, until `heal`."""
        self.cuts += 1
        self.refusing = refuse
        return self._reset_all()

    def heal(self) -> None:
        self.refusing = False

    def _reset_all(self) -> int:
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            # A zero linger makes close() send RST: the peer sees the connection reset, not a clean
            # end. Shutting reading down first wakes the pump blocked in recv() on it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):  # the peer reset it already
                sock.shutdown(socket.SHUT_RD)
            sock.close()
        return len(sockets) // 2

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut, or the other side went away
