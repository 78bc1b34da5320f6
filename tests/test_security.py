"""Security end to end, with real processes: tokens of tenants, what one tenant can see of
another's swarms (nothing), quotas, the secure default, and every client (the CLI, the Python
client, the Node.js client, buf curl and grpcurl as README writes them, `swarm up --tls`) served
over mTLS with credentials and refused without. The ways mTLS fails are in test_mtls.py.

The certificates are made by `swarm certs`' own code; the tokens by `swarm-orchestrator add-token`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import secrets_watch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from secrets_watch import watch_secret
from test_polyglot import NODE_DIR, RUN_SWARM, json_documents, require_buf, require_node, run

from fakes.messages_api import FakeMessagesAPI
from stack import BIN, Stack, stack, start
from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client import AsyncSwarmClient, ClientTls, NotFound, SwarmClient, TlsFailed, Unauthenticated
from swarm_client._certs import write_development_certificates

README = Path(__file__).resolve().parents[1] / "README.md"
ORCHESTRATOR = "swarm.v1.OrchestratorService"
GRPCURL = Path(sys.executable).parent / "grpcurl"
# README's secure lines name these; the tests put their own in their place.


@dataclass
class Credentials:
    directory: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def serving(self) -> list[str]:
        return ["--tls-cert", self.path("server.pem"), "--tls-key", self.path("server-key.pem"),
                "--tls-client-ca", self.path("ca.pem")]  # fmt: skip

    @property
    def calling_workers(self) -> list[str]:
        return ["--worker-tls-ca", self.path("ca.pem"), "--worker-tls-cert", self.path("server.pem"),
                "--worker-tls-key", self.path("server-key.pem")]  # fmt: skip

    @property
    def client_tls(self) -> ClientTls:
        return ClientTls(self.path("ca.pem"), self.path("client.pem"), self.path("client-key.pem"))

    def channel(self, target: str, *, cert: bool = True) -> grpc.Channel:
        return grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(
                Path(self.path("ca.pem")).read_bytes(),
                Path(self.path("client-key.pem")).read_bytes() if cert else None,
                Path(self.path("client.pem")).read_bytes() if cert else None,
            ),
        )


def add_token(auth_file: Path, tenant: str) -> str:
    made = subprocess.run(
        [str(BIN / "swarm-orchestrator"), "add-token", "--auth-file", str(auth_file), "--tenant", tenant],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return watch_secret(made.stdout.strip())


def watch_keys(directory: Path) -> None:
    for key in directory.glob("*key.pem"):
        body = "".join(line for line in key.read_text().splitlines() if "-----" not in line)
        watch_secret(body)


def set_quotas(auth_file: Path, tenant: str, **quotas: float) -> None:
    document = json.loads(auth_file.read_text())
    document["tenants"][tenant]["quotas"] = quotas
    auth_file.write_text(json.dumps(document))


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory = tmp_path_factory.mktemp("tls")
    write_development_certificates(directory)
    watch_keys(directory)
    found = Credentials(directory)
    for tenant in ("acme", "bolt", "capped"):
        found.tokens[tenant] = add_token(directory / "auth.json", tenant)
    set_quotas(directory / "auth.json", "capped", concurrent_swarms=1, agents_per_swarm=3, runs_per_minute=3)
    return found


@pytest.fixture(scope="module")
def secure(creds: Credentials) -> Iterator[Stack]:
    """Everything on: mTLS to the orchestrator and to each worker, tokens."""
    with stack(
        2,
        worker_args=creds.serving,
        orchestrator_args=[*creds.serving, *creds.calling_workers, "--auth-file", creds.path("auth.json")],
    ) as running:
        yield running


def note_received(where: str, texts: list[str]) -> None:
    """What a client received goes through the session's secret check too."""
    secrets_watch.note(f"what {where} received", [line for text in texts for line in text.splitlines()])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def stub(creds: Credentials, target: str) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(creds.channel(target))


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        result = call() if callable(call) else call
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # a stream's status comes with its end
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


# ---------------------------------------------------------------- tokens


def test_add_token_prints_a_new_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.json"
    first = add_token(auth_file, "acme")
    second = add_token(auth_file, "acme")
    other = add_token(auth_file, "bolt")
    assert len({first, second, other}) == 3
    assert all(token.startswith("swt_") and len(token) > 40 for token in (first, second, other))
    text = auth_file.read_text()
    for token in (first, second, other):
        assert token not in text and token[4:] not in text
    document = json.loads(text)
    assert [len(document["tenants"][name]["tokens"]) for name in ("acme", "bolt")] == [2, 1]
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    refused = subprocess.run(
        [
            str(BIN / "swarm-orchestrator"),
            "add-token",
            "--auth-file",
            str(auth_file),
            "--tenant",
            "no spaces",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and "not a tenant name" in refused.stderr


def test_every_swarm_rpc_needs_a_known_token_but_health_and_reflection_do_not(
    secure: Stack, creds: Credentials
) -> None:
    orchestrator = stub(creds, secure.target)
    calls = {
        "RunSwarm": lambda md: orchestrator.RunSwarm(
            orchestrator_pb2.RunSwarmRequest(idea="x", num_agents=1), metadata=md, timeout=10
        ),
        "WatchSwarm": lambda md: orchestrator.WatchSwarm(
            orchestrator_pb2.WatchSwarmRequest(swarm_id="x"), metadata=md, timeout=10
        ),
        "GetSwarm": lambda md: orchestrator.GetSwarm(
            orchestrator_pb2.GetSwarmRequest(swarm_id="x"), metadata=md, timeout=10
        ),
        "ListSwarms": lambda md: orchestrator.ListSwarms(
            orchestrator_pb2.ListSwarmsRequest(), metadata=md, timeout=10
        ),
        "CancelSwarm": lambda md: orchestrator.CancelSwarm(
            orchestrator_pb2.CancelSwarmRequest(swarm_id="x"), metadata=md, timeout=10
        ),
        "GetOrchestratorInfo": lambda md: orchestrator.GetOrchestratorInfo(
            orchestrator_pb2.GetOrchestratorInfoRequest(), metadata=md, timeout=10
        ),
    }
    unknown = "swt_" + "A" * 43
    for name, call in calls.items():
        for metadata in [(), bearer(unknown), (("authorization", "Basic dXNlcjpwYXNz"),), bearer("")]:
            code, details = code_of(lambda call=call, metadata=metadata: call(metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, metadata, code, details)
            assert unknown not in details
    info = orchestrator.GetOrchestratorInfo(
        orchestrator_pb2.GetOrchestratorInfoRequest(), metadata=bearer(creds.tokens["capped"]), timeout=10
    )
    assert (
        info.tenant == "capped" and info.quotas.concurrent_swarms == 1 and info.quotas.agents_per_swarm == 3
    )

    channel = creds.channel(secure.target)
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=ORCHESTRATOR), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    assert ORCHESTRATOR in {
        service.name for answer in listed for service in answer.list_services_response.service
    }
    # The refusals are logged, the tokens never (the session's secret check reads the log too).
    assert "refused a call: the token is not known" in secure.orchestrator.output()


def test_reflection_needs_a_token_when_told_to(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.json"
    token = add_token(auth_file, "acme")
    with stack(1, orchestrator_args=["--auth-file", str(auth_file), "--reflection-needs-token"]) as running:
        channel = grpc.insecure_channel(running.target)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = [reflection_pb2.ServerReflectionRequest(list_services="")]
        code, _ = code_of(lambda: reflection.ServerReflectionInfo(iter(request), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflection.ServerReflectionInfo(iter(request), metadata=bearer(token), timeout=10))
        assert answers and answers[0].list_services_response.service
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- tenants


async def test_a_tenant_cannot_see_watch_or_cancel_another_tenants_swarms(
    secure: Stack, creds: Credentials
) -> None:
    acme = AsyncSwarmClient(secure.target, tls=creds.client_tls, token=creds.tokens["acme"])
    bolt = AsyncSwarmClient(secure.target, tls=creds.client_tls, token=creds.tokens["bolt"])
    async with acme, bolt:
        finished = [e async for e in acme.run("acme's finished idea", 2, request_id="shared-key")]
        finished_id = finished[0].swarm_id
        assert finished[-1].WhichOneof("kind") == "swarm_completed"
        assert finished[0].accepted.tenant == "acme"
        # A running one (slow: 8 agents on a shared pool), started detached.
        running_events = acme.run("acme's running idea", 8, detach=True)
        running_id = (await anext(running_events)).swarm_id
        await running_events.aclose()

        assert (await acme.get(finished_id)).tenant == "acme"
        for swarm_id in (finished_id, running_id):
            unknown_id = "0" * len(swarm_id)
            with pytest.raises(NotFound) as unknown:
                await bolt.get(unknown_id)
            with pytest.raises(NotFound) as theirs:
                await bolt.get(swarm_id)
            assert str(theirs.value).replace(swarm_id, "ID") == str(unknown.value).replace(unknown_id, "ID")
            with pytest.raises(NotFound):
                await anext(bolt.watch(swarm_id))
            with pytest.raises(NotFound):
                await bolt.cancel(swarm_id)
        assert (await acme.get(running_id)).state != orchestrator_pb2.SWARM_STATE_CANCELLED
        listed = await bolt.list()
        assert finished_id not in {s.swarm_id for s in listed.swarms} and running_id not in {
            s.swarm_id for s in listed.swarms
        }
        assert {s.swarm_id for s in (await acme.list()).swarms} >= {finished_id, running_id}
        # bolt's request_id is bolt's: the same key starts bolt's own swarm, not a replay of acme's.
        theirs_first = [e async for e in bolt.run("bolt's idea", 1, request_id="shared-key")]
        assert theirs_first[0].swarm_id != finished_id and theirs_first[0].accepted.tenant == "bolt"
        assert {s.swarm_id for s in (await bolt.list()).swarms} == {theirs_first[0].swarm_id}
        await acme.cancel(running_id)


def quota_failure(error: grpc.RpcError) -> error_details_pb2.QuotaFailure:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    (detail,) = status.details
    failure = error_details_pb2.QuotaFailure()
    assert detail.Unpack(failure)
    return failure


def test_quotas_refuse_before_any_model_call_with_a_quota_failure(secure: Stack, creds: Credentials) -> None:
    orchestrator = stub(creds, secure.target)
    md = bearer(creds.tokens["capped"])

    def run(agents: int, detach: bool = True) -> grpc.RpcError | str:
        try:
            stream = orchestrator.RunSwarm(
                orchestrator_pb2.RunSwarmRequest(idea="a capped idea", num_agents=agents, detach=detach),
                metadata=md,
                timeout=30,
            )
            return next(iter(stream)).event.swarm_id
        except grpc.RpcError as error:
            return error

    too_big = run(4)
    assert isinstance(too_big, grpc.RpcError) and too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (violation,) = quota_failure(too_big).violations
    assert violation.subject == "tenant:capped" and "agents_per_swarm" in violation.description
    first = run(3)
    assert isinstance(first, str)
    second = run(1)
    assert (
        isinstance(second, grpc.RpcError)
        and "concurrent_swarms" in quota_failure(second).violations[0].description
    )
    orchestrator.CancelSwarm(orchestrator_pb2.CancelSwarmRequest(swarm_id=first), metadata=md, timeout=30)
    third = run(1)
    assert (
        isinstance(third, grpc.RpcError)
        and "runs_per_minute" in quota_failure(third).violations[0].description
    )
    # Nothing refused reached the model: only the one swarm that was let through was planned.
    listed = orchestrator.ListSwarms(orchestrator_pb2.ListSwarmsRequest(), metadata=md, timeout=30)
    assert [s.swarm_id for s in listed.swarms] == [first]


def test_a_swarm_that_reaches_the_daily_cost_quota_fails_and_the_next_is_refused(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.json"
    token = add_token(auth_file, "thrifty")
    measuring = add_token(auth_file, "measuring")
    key = watch_secret("sk-ant-quota-test-0123456789")
    with FakeMessagesAPI(api_key=key, chunks=2) as fake:
        env = {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": fake.base_url}
        with stack(2, env=env, orchestrator_args=["--provider", "anthropic", "--auth-file", str(auth_file)],
                   worker_args=["--provider", "anthropic"]) as running:  # fmt: skip
            client = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(running.target))

            def run(tenant_token: str, agents: int, idea: str = "spend it") -> list[events_pb2.SwarmEvent]:
                request = orchestrator_pb2.RunSwarmRequest(idea=idea, num_agents=agents, max_parallel=1)
                return [r.event for r in client.RunSwarm(request, metadata=bearer(tenant_token), timeout=60)]

            # What a plan and an answer cost here, measured by another tenant's swarm.
            measured = run(measuring, 12)
            plan = next(e.plan_created.usage.cost_usd for e in measured if e.HasField("plan_created"))
            answer = max(
                e.subtask_completed.usage.cost_usd for e in measured if e.HasField("subtask_completed")
            )
            assert plan > 0 and answer > 0
            # Room for the plan and three answers of twelve: the quota is met mid-swarm.
            cap = plan + 3.5 * answer
            set_quotas(auth_file, "thrifty", cost_usd_per_day=cap)
            time.sleep(1.1)  # the file is looked at again at most once a second
            events = run(token, 12)
            end = events[-1]
            assert end.WhichOneof("kind") == "swarm_failed", end
            assert end.swarm_failed.quota == "cost_usd_per_day"
            assert f"cost_usd_per_day {cap:g}" in end.swarm_failed.error
            assert "the swarm is stopped" in end.swarm_failed.error
            completed = sum(e.WhichOneof("kind") == "subtask_completed" for e in events)
            assert 3 <= completed < 12
            try:
                run(token, 1, idea="refuse this one")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert quota_failure(error).violations[0].subject == "tenant:thrifty"
            else:
                pytest.fail("a tenant over its daily cost quota started a swarm")
            # Told apart by its idea: the stopped swarm's last calls may still be on their way.
            refused = [r for r in fake.requests if "refuse this one" in json.dumps(r.body)]
            assert not refused, "the refused swarm reached the model"
            assert run(measuring, 1)[-1].HasField("swarm_completed"), (
                "another tenant's quota stopped this one"
            )


# ---------------------------------------------------------------- secure defaults


def test_without_tokens_a_network_listen_refuses_to_start_in_one_line() -> None:
    result = subprocess.run(
        [
            str(BIN / "swarm-orchestrator"),
            "--listen",
            "0.0.0.0:0",
            "--db",
            ":memory:",
            "--provider",
            "simulated",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SWARM_")},
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("swarm-orchestrator: refusing to serve 0.0.0.0:0 without authentication"), line
    assert "--auth-file" in line and "--allow-unauthenticated" in line
    opted_out = start(
        "orchestrator",
        "swarm-orchestrator",
        ["--db", ":memory:", "--provider", "simulated", "--allow-unauthenticated"],
        listen="0.0.0.0:0",
    )
    assert opted_out.stop() == 0


# ---------------------------------------------------------------- every client, with and without credentials


def test_the_cli_runs_a_swarm_with_tls_and_a_token_and_is_refused_without(
    secure: Stack, creds: Credentials
) -> None:
    base = [str(BIN / "swarm"), "--target", secure.target]
    tls = [
        "--tls-ca",
        creds.path("ca.pem"),
        "--tls-cert",
        creds.path("client.pem"),
        "--tls-key",
        creds.path("client-key.pem"),
    ]
    env = {**os.environ, "SWARM_TOKEN": creds.tokens["acme"]}
    ran = subprocess.run([*base, *tls, "run", "a CLI idea", "--agents", "2", "--json"],
                         capture_output=True, text=True, timeout=90, check=False, env=env)  # fmt: skip
    note_received("the CLI", [ran.stdout, ran.stderr])
    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert "swarm_completed" in events[-1] and events[0]["accepted"]["tenant"] == "acme"
    no_env = {k: v for k, v in os.environ.items() if k != "SWARM_TOKEN"}
    for args, env_, words, status in [
        ([*tls, "run", "x"], no_env, "refused the call: no token", 1),
        ([*tls, "--token", "swt_" + "B" * 43, "run", "x"], no_env, "the token is not known", 1),
        (["run", "x"], env, "does it serve TLS?", 3),
        (["--tls-ca", creds.path("ca.pem"), "run", "x"], env, "requires a client certificate", 3),
    ]:
        refused = subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=60, check=False, env=env_
        )
        note_received("the CLI", [refused.stdout, refused.stderr])
        assert refused.returncode == status, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert words in line, line
        assert "swt_" not in line


async def test_the_python_client_runs_a_swarm_and_is_refused_without_credentials(
    secure: Stack, creds: Credentials
) -> None:
    async with AsyncSwarmClient(secure.target, tls=creds.client_tls, token=creds.tokens["bolt"]) as client:
        events = [event async for event in client.run("a Python idea", 2)]
        note_received("the Python client", [str(event) for event in events])
        assert events[-1].WhichOneof("kind") == "swarm_completed"
        assert (await client.estimate("a Python idea", 2)).total.high_tokens > 0
    with SwarmClient(secure.target, tls=creds.client_tls, token=creds.tokens["bolt"]) as sync_client:
        assert sync_client.estimate("a Python idea", 2).total.high_tokens > 0
    async with AsyncSwarmClient(secure.target, tls=creds.client_tls, token="") as client:
        with pytest.raises(Unauthenticated, match="no token"):
            await client.list()
    no_cert = ClientTls(creds.path("ca.pem"))
    async with AsyncSwarmClient(secure.target, tls=no_cert, token=creds.tokens["bolt"]) as client:
        with pytest.raises(TlsFailed, match="requires a client certificate"):
            await client.list()


def test_the_web_console_reaches_a_secure_orchestrator_as_its_tenant(
    secure: Stack, creds: Credentials
) -> None:
    tls = [
        "--tls-ca",
        creds.path("ca.pem"),
        "--tls-cert",
        creds.path("client.pem"),
        "--tls-key",
        creds.path("client-key.pem"),
    ]
    console = start(
        "web", "swarm-web", ["--target", secure.target, *tls], {"SWARM_TOKEN": creds.tokens["bolt"]}
    )
    without = start("web", "swarm-web", ["--target", secure.target, *tls])
    try:
        base = f"http://{console.address}"
        info = httpx.get(f"{base}/api/info", timeout=30).json()
        assert info["tenant"] == "bolt"
        started = httpx.post(
            f"{base}/api/swarms", json={"idea": "from the console", "numAgents": 1}, timeout=30
        )
        assert started.status_code == 201, started.text
        swarm = httpx.get(f"{base}/api/swarms/{started.json()['swarmId']}", timeout=30).json()
        assert swarm["tenant"] == "bolt"
        refused = httpx.get(f"http://{without.address}/api/info", timeout=30)
        assert refused.status_code == 401, refused.text
        note_received("the console", [started.text, refused.text, json.dumps(info)])
    finally:
        console.stop()
        without.stop()


def test_the_node_client_runs_a_swarm_and_is_refused_without_credentials(
    secure: Stack, creds: Credentials
) -> None:
    node = require_node()
    base = [node, RUN_SWARM, "--target", secure.target, "--agents", "2", "--tls-ca", creds.path("ca.pem"),
            "--tls-cert", creds.path("client.pem"), "--tls-key", creds.path("client-key.pem")]  # fmt: skip
    previous = os.environ.get("SWARM_TOKEN")
    os.environ["SWARM_TOKEN"] = creds.tokens["acme"]  # as a user would pass it: not on the command line
    try:
        result = run([*base, "a Node.js idea"], timeout=90, cwd=NODE_DIR)
    finally:
        if previous is None:
            os.environ.pop("SWARM_TOKEN")
        else:
            os.environ["SWARM_TOKEN"] = previous
    note_received("the Node.js client", [result.stdout, result.stderr])
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["kind"] == "swarm_completed" and events[0]["accepted"]["tenant"] == "acme"
    refused = run([*base, "no token"], timeout=60, cwd=NODE_DIR)
    note_received("the Node.js client", [refused.stdout, refused.stderr])
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    no_cert = run(
        [node, RUN_SWARM, "--target", secure.target, "--tls-ca", creds.path("ca.pem"), "x"],
        timeout=60,
        cwd=NODE_DIR,
    )
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr, no_cert.stderr


def readme_secure_lines(tool: str) -> list[list[str]]:
    """README's lines that reach a secure orchestrator with `tool`, continuation lines joined, with
    the tests' certificates, token and target in place of the documented ones."""
    text = README.read_text().replace("\\\n", " ")
    return [
        shlex.split(line)
        for line in text.splitlines()
        if line.startswith(f"{tool} ") and ("-cacert" in line.split() or "--cacert" in line.split())
    ]


def placed(command: list[str], creds: Credentials, target: str) -> list[str]:
    args = []
    for arg in command:
        arg = arg.replace("localhost:50051", target).replace("certs/", f"{creds.directory}/")
        args.append(arg.replace("$SWARM_TOKEN", creds.tokens["acme"]))
    return args


def test_readme_documents_secure_grpcurl_and_buf_curl_lines() -> None:
    assert [line[-1] for line in readme_secure_lines("grpcurl")] == ["list", f"{ORCHESTRATOR}/RunSwarm"]
    assert [line[-1] for line in readme_secure_lines("$buf")][-1].endswith(f"{ORCHESTRATOR}/RunSwarm")


@pytest.mark.parametrize("tool", ["grpcurl", "$buf"])
def test_readme_secure_lines_run_a_swarm_and_are_refused_without_credentials(
    secure: Stack, creds: Credentials, tool: str, tmp_path: Path
) -> None:
    binary = str(GRPCURL) if tool == "grpcurl" else str(require_buf())
    for command in readme_secure_lines(tool):
        args = placed(command, creds, secure.target)
        result = run([binary, *args[1:]], timeout=90, cwd=tmp_path)
        note_received(tool, [result.stdout, result.stderr])
        assert result.returncode == 0, result.describe(args)
        if command[-1].endswith("/RunSwarm"):
            events = [document["event"] for document in json_documents(result.stdout)]
            assert any("swarm_completed" in e or "swarmCompleted" in e for e in events[-1:]), result.stdout
            # Without the token (the header and its flag): refused, UNAUTHENTICATED.
            no_token = list(args)
            header = next(i for i, arg in enumerate(no_token) if arg.startswith("authorization:"))
            del no_token[header - 1 : header + 1]
            refused = run([binary, *no_token[1:]], timeout=60, cwd=tmp_path)
            note_received(tool, [refused.stdout, refused.stderr])
            said = (refused.stdout + refused.stderr).lower()
            assert refused.returncode != 0 and "unauthenticated" in said, refused.describe(no_token)
            # Without the client certificate: refused by the TLS handshake.
            no_cert = list(args)
            for flag in ("-cert", "-key") if tool == "grpcurl" else ("--cert", "--key"):
                index = no_cert.index(flag)
                del no_cert[index : index + 2]
            refused = run([binary, *no_cert[1:]], timeout=60, cwd=tmp_path)
            assert refused.returncode != 0, refused.describe(no_cert)


def test_swarm_up_tls_runs_a_local_stack_with_mtls_and_a_token(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SWARM_")},
        "SWARM_SIM_LATENCY_MS": "50",
    }
    env.pop("ANTHROPIC_API_KEY", None)
    up = subprocess.run(
        [
            str(BIN / "swarm"),
            "up",
            "--tls",
            "--demo",
            "--workers",
            "2",
            "--agents",
            "2",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**env, "COLUMNS": "160"},
    )
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert "mTLS on every hop, and a token for tenant local" in up.stderr
    watch_keys(tmp_path / "tls")
    for log in ("orchestrator.log", "worker-1.log"):
        assert "(mTLS: client certificates required)" in (tmp_path / log).read_text()
    assert "swarm_completed" in up.stdout or "completed" in up.stdout
