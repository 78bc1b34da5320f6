"""mTLS on both hops, with real processes: each way a handshake fails (no certificate, another
CA, expired, another host name) is one clear line, for a client of the orchestrator and for the
orchestrator as a client of a worker, and grpc's own line on the server's side; renewed
certificates are served, and presented, without a restart."""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from test_security import watch_keys

from stack import BIN, stack, start
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client._certs import Authority, Issued, write_development_certificates

# ---------------------------------------------------------------- mTLS failures, both hops


def issued(directory: Path, name: str, cert: Issued) -> tuple[str, str]:
    (directory / f"{name}.pem").write_bytes(cert.cert)
    (directory / f"{name}-key.pem").write_bytes(cert.key)
    watch_keys(directory)
    return str(directory / f"{name}.pem"), str(directory / f"{name}-key.pem")


@pytest.fixture(scope="module")
def odd_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Certificates that must be refused: from another CA, expired, for another host."""
    directory = tmp_path_factory.mktemp("odd")
    stranger = Authority("a stranger's CA")
    (directory / "stranger-ca.pem").write_bytes(stranger.pem)
    now = datetime.datetime.now(datetime.UTC)
    ca = Authority("odd test CA")
    (directory / "ca.pem").write_bytes(ca.pem)
    past = {"not_before": now - datetime.timedelta(days=3), "not_after": now - datetime.timedelta(days=1)}
    return {
        "ca": (str(directory / "ca.pem"), ""),
        "stranger-ca": (str(directory / "stranger-ca.pem"), ""),
        "server": issued(directory, "server", ca.issue("s", hosts=["127.0.0.1"], client=True)),
        "client": issued(directory, "client", ca.issue("c", client=True, server=False)),
        "stranger-client": issued(
            directory, "stranger-client", stranger.issue("c", client=True, server=False)
        ),
        "expired-client": issued(
            directory, "expired-client", ca.issue("c", client=True, server=False, **past)
        ),
        "expired-server": issued(directory, "expired-server", ca.issue("s", hosts=["127.0.0.1"], **past)),
        "other-host": issued(
            directory, "other-host", ca.issue("s", hosts=["elsewhere.example"], client=True)
        ),
    }


def serve_with(odd: dict[str, tuple[str, str]], server: str, *, mutual: bool = True) -> list[str]:
    cert, key = odd[server]
    return ["--tls-cert", cert, "--tls-key", key, *(["--tls-client-ca", odd["ca"][0]] if mutual else [])]


CLIENT_CASES = {
    # case: (the server's certificate, the CA the client trusts, the client's certificate, expected words)
    "no client certificate": ("server", "ca", "", "requires a client certificate"),
    "client certificate of another CA": (
        "server",
        "ca",
        "stranger-client",
        "refused this client's certificate",
    ),
    "expired client certificate": (
        "server",
        "ca",
        "expired-client",
        "refused this client's certificate (expired",
    ),
    "server certificate of another CA": ("server", "stranger-ca", "client", "is not signed by --tls-ca"),
    "expired server certificate": ("expired-server", "ca", "client", "certificate has expired"),
    "server certificate for another host": ("other-host", "ca", "client", "not for this host name"),
}


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_a_client_refused_by_mtls_says_why_in_one_line(
    odd_certs: dict[str, tuple[str, str]], case: str
) -> None:
    server, ca, client, words = CLIENT_CASES[case]
    orchestrator = start(
        "orchestrator",
        "swarm-orchestrator",
        [
            "--provider",
            "simulated",
            "--db",
            ":memory:",
            "--workers",
            "127.0.0.1:1",
            *serve_with(odd_certs, server),
        ],
        # grpc's default: it tells of failed handshakes (the tests' own process asks for errors only).
        {"GRPC_VERBOSITY": "INFO"},
    )
    try:
        args = [str(BIN / "swarm"), "--target", orchestrator.address, "--tls-ca", odd_certs[ca][0]]
        if client:
            args += ["--tls-cert", odd_certs[client][0], "--tls-key", odd_certs[client][1]]
        result = subprocess.run([*args, "list"], capture_output=True, text=True, timeout=60, check=False)
    finally:
        orchestrator.stop()
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith(
        f"swarm: the TLS connection to the orchestrator at {orchestrator.address} failed: "
    )
    assert words in line, line
    if "client" in case:  # the server's side says it too, in grpc's own line
        reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE" if not client else "CERTIFICATE_VERIFY_FAILED"
        assert any("Handshake failed" in line and reason in line for line in orchestrator.lines)


WORKER_CASES = {
    # case: (the worker's certificate, the CA the orchestrator checks it with, whether the
    # orchestrator presents its certificate, expected words in its log)
    "no client certificate": ("server", "ca", False, "it may require a client certificate"),
    "worker certificate of another CA": ("server", "stranger-ca", True, "not signed by the CA given"),
    "expired worker certificate": ("expired-server", "ca", True, "certificate has expired"),
    "worker certificate for another host": ("other-host", "ca", True, "not for this host name"),
}


@pytest.mark.parametrize("case", WORKER_CASES)
def test_an_orchestrator_refused_by_a_worker_or_refusing_it_says_why_in_one_line(
    odd_certs: dict[str, tuple[str, str]], case: str
) -> None:
    worker_cert, ca, presents, words = WORKER_CASES[case]
    calling = ["--worker-tls-ca", odd_certs[ca][0]]
    if presents:
        calling += ["--worker-tls-cert", odd_certs["client"][0], "--worker-tls-key", odd_certs["client"][1]]
    with stack(
        1,
        worker_args=serve_with(odd_certs, worker_cert),
        orchestrator_args=[*calling, "--no-worker-timeout", "1", "--allow-unauthenticated"],
    ) as running:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "worker unreachable" not in running.orchestrator.output():
            time.sleep(0.1)
        lines = [line for line in running.orchestrator.lines if "worker unreachable" in line]
    assert lines, running.orchestrator.output()
    message = json.loads(lines[0])["msg"]
    assert message.startswith("worker unreachable: UNAVAILABLE: TLS: ") and words in message, message


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    write_development_certificates(tmp_path)
    watch_keys(tmp_path)
    orchestrator = start(
        "orchestrator",
        "swarm-orchestrator",
        ["--provider", "simulated", "--db", ":memory:", "--workers", "127.0.0.1:1",
         "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server-key.pem")],
    )  # fmt: skip

    def served_serial() -> int:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        host, port = orchestrator.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            context.set_alpn_protocols(["h2"])
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    try:
        before = served_serial()
        renewed = Authority("renewal CA")
        fresh = renewed.issue("renewed server", hosts=["127.0.0.1"])
        # As cert-manager or `swarm certs` renew: whole files, renamed into place.
        for name, data in [
            ("ca.pem", renewed.pem),
            ("server.pem", fresh.cert),
            ("server-key.pem", fresh.key),
        ]:
            (tmp_path / f".{name}").write_bytes(data)
            os.replace(tmp_path / f".{name}", tmp_path / name)
        watch_keys(tmp_path)
        after = served_serial()
        assert after != before
        assert orchestrator.popen.poll() is None, "the orchestrator restarted"
        assert "serving a renewed TLS certificate" in orchestrator.output()
    finally:
        orchestrator.stop()


def test_the_orchestrator_calls_workers_with_its_renewed_client_certificate_without_a_restart(
    tmp_path: Path,
) -> None:
    ca = Authority("renewal test CA")
    now = datetime.datetime.now(datetime.UTC)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    worker_cert = issued(tmp_path, "worker", ca.issue("w", hosts=["127.0.0.1"]))
    expired = ca.issue("o", client=True, server=False, not_before=now - datetime.timedelta(days=2),
                       not_after=now - datetime.timedelta(days=1))  # fmt: skip
    client_cert = issued(tmp_path, "orchestrator", expired)
    calling = ["--worker-tls-ca", str(tmp_path / "ca.pem"), "--worker-tls-cert", client_cert[0],
               "--worker-tls-key", client_cert[1], "--allow-unauthenticated"]  # fmt: skip
    serving = [
        "--tls-cert",
        worker_cert[0],
        "--tls-key",
        worker_cert[1],
        "--tls-client-ca",
        str(tmp_path / "ca.pem"),
    ]
    with stack(1, worker_args=serving, orchestrator_args=calling) as running:
        deadline = time.monotonic() + 20
        while "worker unreachable" not in running.orchestrator.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "refused the client certificate" in running.orchestrator.output()
        renewed = ca.issue("o", client=True, server=False)
        for path, data in [(client_cert[0], renewed.cert), (client_cert[1], renewed.key)]:
            Path(f"{path}.new").write_bytes(data)
            os.replace(f"{path}.new", path)
        watch_keys(tmp_path)
        while "worker ready" not in running.orchestrator.output() and time.monotonic() < deadline + 20:
            time.sleep(0.1)
        assert "a new channel to the worker, with the renewed TLS files" in running.orchestrator.output()
        client = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(running.target))
        events = [
            r.event
            for r in client.RunSwarm(orchestrator_pb2.RunSwarmRequest(idea="x", num_agents=2), timeout=60)
        ]
        assert events[-1].HasField("swarm_completed"), events[-1]
        assert running.orchestrator.popen.poll() is None


def test_swarm_certs_writes_a_ca_and_server_and_client_certificates(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    made = subprocess.run(
        [
            str(BIN / "swarm"),
            "certs",
            str(tmp_path / "certs"),
            "--host",
            "orchestrator",
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    directory = tmp_path / "certs"
    watch_keys(directory)
    names = {"ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"}
    assert {path.name for path in directory.iterdir()} == names
    for key in ("server-key.pem", "client-key.pem"):
        assert oct((directory / key).stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((directory / "client.pem").read_bytes())
    assert server.issuer == ca.subject and client.issuer == ca.subject
    hosts = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert hosts.get_values_for_type(x509.DNSName) == ["orchestrator"]
    assert [str(ip) for ip in hosts.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    assert "private" in made.stdout and "PRIVATE KEY" not in made.stdout
