"""An HTTP/2 client over a plain socket, for what a gRPC client never does: keep its receive window
shut, open more streams than the server allows, or fall silent without closing anything."""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """One gRPC message on the wire: uncompressed, its length, its bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class RawH2:
    def __init__(self, address: str, *, window: int | None = None) -> None:
        """`window`: the receive window of each stream this client opens; 0 = the server can send
        no reply data at all (this client never opens it)."""
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())
        self.events: list[h2.events.Event] = []
        self.silent = False

    def open(self, method: str, request: bytes | None, *, end: bool = True) -> int:
        """Starts a call of `method` (/package.Service/Method) with one request, or none yet (then
        `send` sends them); its stream id. `end`: the client sends nothing more."""
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        if request is not None:
            self.conn.send_data(stream_id, grpc_frame(request), end_stream=end)
        self.sock.sendall(self.conn.data_to_send())
        return stream_id

    def send(self, stream_id: int, message: bytes, within_s: float) -> bool:
        """Sends one more request message, as the server's flow control lets it through; False if
        the server has not made room for it within `within_s` (it stopped reading)."""
        data = grpc_frame(message)
        end = time.monotonic() + within_s
        while data:
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0:
                if time.monotonic() >= end:
                    return False
                self.pump(0.05)
                continue
            self.conn.send_data(stream_id, data[:room])
            data = data[room:]
            self.sock.sendall(self.conn.data_to_send())
        return True

    def pump(self, seconds: float) -> None:
        """Reads what the server sends for `seconds`, answering its pings and settings unless
        silent. A silent client reads nothing and answers nothing: a peer that vanished."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.silent:
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                continue
            self.sock.settimeout(max(0.01, min(0.1, end - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            self.events += self.conn.receive_data(data)
            self.sock.sendall(self.conn.data_to_send())

    def resets(self) -> set[int]:
        return {e.stream_id for e in self.events if isinstance(e, h2.events.StreamReset)}

    def ended(self) -> set[int]:
        return {e.stream_id for e in self.events if isinstance(e, h2.events.StreamEnded)}

    def responded(self) -> set[int]:
        return {e.stream_id for e in self.events if isinstance(e, h2.events.ResponseReceived)}

    def max_concurrent_streams(self) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    return int(changed.new_value)
        return None

    def close(self) -> None:
        self.sock.close()
