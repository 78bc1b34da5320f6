"""The session's secret check finds what it is there to find, and shows none of it."""

from __future__ import annotations

import secrets_watch

from stack import start


def test_the_check_finds_keys_tokens_private_keys_and_registered_secrets() -> None:
    registered = secrets_watch.watch_secret("a-secret-made-by-this-test-0123")
    lines = [
        "nothing to see",
        "key sk-ant-api03-abcdef in a message",
        "authorization: Bearer swt_abcdefghijklmnopqrstuvwxyz012345",
        "-----BEGIN PRIVATE KEY-----",
        f"it leaked {registered} here",
        "the word swt_ alone, and sk- alone, are no secret",
    ]
    found = secrets_watch.leaks_in("a test", lines)
    assert [line.split(",")[1].split(":")[0].strip() for line in found] == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
    ]
    assert not any("abcdef" in line or registered in line for line in found), "the report shows the secret"


def test_every_service_output_is_read_when_it_ends() -> None:
    seen: list[str] = []
    from stack import OUTPUT_WATCHERS

    OUTPUT_WATCHERS.append(lambda process: seen.append(process.name))
    try:
        process = start("checked", "swarm-worker", ["--provider", "simulated"])
        process.stop()
    finally:
        OUTPUT_WATCHERS.pop()
    assert seen == ["checked"]
