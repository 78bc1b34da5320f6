"""A DNS server on 127.0.0.1 (UDP, port 0) that answers A queries for one name from a list the test
changes, so the orchestrator's `dns://SERVER/name:port` target can see workers come and go."""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Self

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class FakeDNS:
    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.rstrip(".") + "."
        self.addresses = list(addresses)
        self.queries = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            self.queries += 1
            if str(question.name).lower() == self.name and question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text_list(self.name, 1, "IN", "A", list(self.addresses))
                )
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self._socket.sendto(response.to_wire(), client)
