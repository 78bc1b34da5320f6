"""Addresses in settings: `HOST:PORT` split the same way wherever one is read."""

from __future__ import annotations


def split_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """`host:port` or `[v6]:port`. The host may be empty: what that means is the caller's to say."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
