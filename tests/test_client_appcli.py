"""
Tests for ``m2mgw-app`` (m2mgw.client.appcli): parsing and one-line errors,
every command against the scripted gateway, real connection and TLS
failures, and end to end against the gateway's real service tree on
127.0.0.1 with a real module waking over UDP.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import deferLater

from m2mgw.client import appcli
from m2mgw.client.app import AppEvent, BlockingAppClient, parse_message
from m2mgw.client.transport import wake_plan
from m2mgw.records import Module
from tests.app_client_helpers import (
    PSK,
    Refusal,
    SocketGateway,
    World,
    real_gateway,
    real_module,
    server_ssl_context,
    wake,
)
from tests.doubles import InProcessPKI


@dataclass
class Run:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(*argv: str, gateway: SocketGateway | None = None, stdin: str = "", **kwargs: Any) -> Run:
    """Run ``m2mgw-app`` in this process (against ``gateway`` if given)."""
    out, err = io.StringIO(), io.StringIO()
    factory = None
    if gateway is not None:
        served = gateway

        def factory(ctx: appcli.Context) -> BlockingAppClient:
            return BlockingAppClient("gw", 5741, opener=served.opener, timeout=5.0)

    status = appcli.main(
        list(argv),
        stdout=out,
        stderr=err,
        stdin=io.StringIO(stdin),
        environ=kwargs.pop("environ", {}),
        client_factory=kwargs.pop("client_factory", factory),
    )
    return Run(status, out.getvalue(), err.getvalue())


def assert_one_line_error(result: Run, *fragments: str) -> None:
    assert result.status == 1, result
    assert result.err.startswith("m2mgw-app: error: "), result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


@pytest.fixture
def gateway() -> Iterator[SocketGateway]:
    served = SocketGateway(World())
    yield served
    served.close()


# -- parsing and mistakes --------------------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    result = run("--help")
    assert result.status == 0
    text = capsys.readouterr().out
    for command in ("tail", "submit", "get", "modules", "cancel", "rotate", "approve", "refuse"):
        assert command in text


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("launch",), "invalid choice: 'launch'"),
        (("get", "m", "x"), "'x' is not a whole number"),
        (("get", "m", "0"), "'0' is not a whole number"),
        (("submit", "m", "set", "1", "--ttl", "5", "--not-after", "9"), "not allowed with"),
        (("submit", "m", "set", "--ttl", "-1"), "argument --ttl"),
        (("--gateway", "host:99999", "modules"), "the port must be 1-65535"),
        (("--timeout", "0", "modules"), "must be a positive number"),
        (("tail", "--count", "0"), "argument --count"),
    ],
)
def test_usage_mistakes_are_one_line(argv: tuple[str, ...], fragment: str) -> None:
    result = run(*argv)
    assert_one_line_error(result, fragment)


def test_without_credentials() -> None:
    result = run("modules")
    assert_one_line_error(result, "give --cert-dir DIR", "--cert, --key, --ca")
    result = run("--cert", "c.pem", "modules")
    assert_one_line_error(result, "or --key, --ca")


def test_cert_dir_mistakes(tmp_path: Path) -> None:
    assert_one_line_error(run("--cert-dir", str(tmp_path / "nope"), "modules"), "does not exist")
    for name in ("a", "b"):
        (tmp_path / f"{name}.pem").write_text("x")
        (tmp_path / f"{name}-key.pem").write_text("x")
    assert_one_line_error(run("--cert-dir", str(tmp_path), "modules"), "a, b; choose one")
    result = run("--cert-dir", str(tmp_path), "--name", "a", "modules")
    assert_one_line_error(result, "m2mgw-ca.pem does not exist")
    # The environment gives the directory too.
    result = run("modules", environ={"M2MGW_APP_CERT_DIR": str(tmp_path)})
    assert_one_line_error(result, "a, b; choose one")


def test_bad_gateway_in_the_environment() -> None:
    result = run(
        "--cert", "c", "--key", "k", "--ca", "a", "modules",
        environ={"M2MGW_APP_GATEWAY": "[::1"},
    )  # fmt: skip
    assert_one_line_error(result, "$M2MGW_APP_GATEWAY", "unclosed [")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("{oops", "BODY is not JSON"), ("on", "a text body needs quotes"), ("NaN", "not JSON")],
)
def test_a_body_that_is_not_json(gateway: SocketGateway, body: str, fragment: str) -> None:
    result = run("submit", "m", "set", body, gateway=gateway)
    assert_one_line_error(result, fragment)
    assert gateway.opened == 0  # refused before connecting


# -- commands against the scripted gateway ---------------------------------------------------------


def test_hello(gateway: SocketGateway) -> None:
    gateway.world.add_event()
    result = run("hello", gateway=gateway)
    assert result.status == 0, result
    assert result.out.splitlines() == [
        "billing at gw:5741: protocol 1",
        "  permissions: cancel submit",
        "  events: acknowledged up to 0, last 1",
    ]
    document = run("--json", "hello", gateway=gateway).json()
    assert document["principal"] == "billing" and document["last_seq"] == 1


def test_tail_prints_a_table_and_acknowledges_what_it_printed(gateway: SocketGateway) -> None:
    world = gateway.world
    world.add_event(
        "report",
        module="meter-17",
        format="senml",
        module_ts=1_750_000_289,
        data=[{"bn": "m:", "n": "temp", "u": "Cel", "v": 21.5}, {"n": "door", "vb": True}],
    )
    world.add_event("instruction", module="meter-17", iid=42, kind="set", state="confirmed",
                    exec_ts=1_750_000_298, status=0)  # fmt: skip
    world.add_event("alert", module=None, origin="gateway", level=3, code="events-dropped",
                    text="4000 events were dropped")  # fmt: skip
    result = run("tail", "--count", "3", gateway=gateway)
    assert result.status == 0, result
    lines = result.out.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "MODULE", "EVENT", "DETAILS"]
    assert lines[1].startswith("1       2025-06-15 15:06:40Z  meter-17")
    assert lines[1].endswith(
        "report       m:temp=21.5 Cel, m:door=true  (measured 2025-06-15 15:11:29Z)"
    )
    assert lines[2].endswith(
        "instruction  #42 set confirmed, executed 2025-06-15 15:11:38Z, status 0 (done)"
    )
    assert lines[3].endswith("alert        level 3 code events-dropped: 4000 events were dropped")
    assert " -  " in lines[3]  # no module
    assert world.acked == 3
    subscribe = next(r for r in world.requests if r["op"] == "subscribe")
    assert subscribe == {"id": 2, "op": "subscribe"}


@pytest.mark.parametrize(
    ("payload", "kind", "details"),
    [
        ({"event": "activated", "kid": 2, "status": "active", "suite": "p256"}, "key",
         "kid 2 activated (now active, p256)"),
        ({"event": "registered", "kid": 3, "status": "pending", "suite": "p256"}, "key",
         "kid 3 registered (now pending, p256)"),
        ({"event": "rejected", "kid": 3, "status": None, "reason": "bad proof"}, "key",
         "kid 3 rejected: bad proof"),
        ({"event": "requested", "status": None, "pid": 2, "iid": 43, "source": "billing"}, "key",
         "rotation requested: keygen #43, params 2, by billing"),
        ({"event": "first-seen", "module": "m", "kid": 0, "suite": "p256", "group": "north"},
         "module", "first-seen (group north, key 0 p256)"),
        ({"event": "approved", "module": "m"}, "module", "approved"),
        ({"module": "m", "format": "cbor", "data": {"bytes": "AAE="}}, "report",
         '{"bytes": "AAE="}'),
        ({"origin": "module", "level": 3, "code": 17, "text": "battery low"}, "alert",
         "level 3 code 17: battery low"),
        ({"iid": 42, "state": "sent", "kind": "set", "exec_ts": None, "status": None},
         "instruction", "#42 set sent"),
        ({"whatever": 1}, "brand-new", '{"whatever": 1}'),
    ],
)  # fmt: skip
def test_tail_details_of_each_event_kind(payload: dict[str, Any], kind: str, details: str) -> None:
    line = json.dumps({"event": kind, "seq": 9, "module": "m", "at": 0, "payload": payload})
    event = parse_message(line.encode())
    assert isinstance(event, AppEvent)
    row = appcli.format_event(event, as_json=False)
    assert row.startswith("9       -                     m ")
    assert row.endswith(f" {details}"), row
    assert json.loads(appcli.format_event(event, as_json=True)) == json.loads(line)


def test_tail_json_filters_and_no_ack(gateway: SocketGateway) -> None:
    world = gateway.world
    world.add_event("report", module="meter-1", data=[1], extra={"kept": True})
    world.add_event("key", module="meter-1", kid=2, status="active")
    result = run(
        "--json", "tail", "--event", "report", "--event", "key", "--module", "meter-1",
        "--group", "north", "--count", "2", "--no-ack", gateway=gateway,
    )  # fmt: skip
    assert result.status == 0, result
    printed = [json.loads(line) for line in result.out.splitlines()]
    assert printed == world.outbox  # as received, one JSON object per line
    subscribe = next(r for r in world.requests if r["op"] == "subscribe")
    assert subscribe["events"] == ["report", "key"]
    assert subscribe["modules"] == ["meter-1"] and subscribe["groups"] == ["north"]
    assert world.acked == 0 and "ack" not in world.ops()


def test_tail_stops_after_idle_seconds(gateway: SocketGateway) -> None:
    started = time.monotonic()
    result = run("--json", "tail", "--idle", "0.2", gateway=gateway)
    assert result.status == 0 and result.out == ""
    assert time.monotonic() - started < 5


def test_tail_stops_cleanly_on_ctrl_c(gateway: SocketGateway) -> None:
    gateway.world.add_event()
    gateway.world.add_event()

    class Interrupted(BlockingAppClient):
        returned = 0

        def next_event(self, timeout: float | None = None) -> AppEvent | None:
            if self.returned == 1:
                raise KeyboardInterrupt
            self.returned += 1
            return super().next_event(timeout)

    def factory(ctx: appcli.Context) -> BlockingAppClient:
        return Interrupted("gw", 5741, opener=gateway.opener, timeout=5.0)

    result = run("--json", "tail", client_factory=factory)
    assert result.status == 0, result
    assert result.err == ""
    assert len(result.out.splitlines()) == 1
    assert gateway.world.acked == 1  # what was printed is acknowledged on the way out


def test_submit_prints_the_iid(gateway: SocketGateway) -> None:
    def submit(connection: Any, request: dict[str, Any]) -> dict[str, Any]:
        return {"module": request["module"], "iid": 42, "state": "queued", "duplicate": False}

    gateway.world.handlers["submit"] = submit
    result = run("submit", "meter-17", "set", '{"interval": 60}', "--ttl", "3600",
                 "--idempotency-key", "t-1", gateway=gateway)  # fmt: skip
    assert result.status == 0, result
    assert result.out == "meter-17 #42 queued\n"
    request = next(r for r in gateway.world.requests if r["op"] == "submit")
    assert request == {
        "id": 2,
        "op": "submit",
        "module": "meter-17",
        "kind": "set",
        "body": {"interval": 60},
        "ttl": 3600,
        "idempotency_key": "t-1",
    }
    run("submit", "meter-17", "rehello", gateway=gateway)
    run("submit", "meter-17", "set", "-", gateway=gateway, stdin='[1, "two"]')
    run("submit", "meter-17", "set", "--not-after", "1750003600", gateway=gateway)
    bodies = [r.get("body") for r in gateway.world.requests if r["op"] == "submit"]
    assert bodies == [{"interval": 60}, None, [1, "two"], None]
    last = [r for r in gateway.world.requests if r["op"] == "submit"][-1]
    assert last["not_after"] == 1_750_003_600 and "ttl" not in last


def test_submit_body_from_a_file(gateway: SocketGateway, tmp_path: Path) -> None:
    gateway.world.handlers["submit"] = lambda c, r: {"iid": 1, "state": "queued"}
    (tmp_path / "body.json").write_text('{"a": [1, 2]}')
    assert run("submit", "m", "set", f"@{tmp_path / 'body.json'}", gateway=gateway).status == 0
    assert gateway.world.requests[-1]["body"] == {"a": [1, 2]}
    result = run("submit", "m", "set", f"@{tmp_path / 'missing.json'}", gateway=gateway)
    assert_one_line_error(result, "missing.json: No such file or directory")


def test_submit_wait_prints_the_execution_time(gateway: SocketGateway) -> None:
    gateway.world.handlers["submit"] = lambda c, r: {"module": "m", "iid": 7, "state": "queued"}
    gateway.world.instructions[("m", 7)] = [
        {"module": "m", "iid": 7, "kind": "set", "state": "sent"},
        {"module": "m", "iid": 7, "kind": "set", "state": "confirmed", "exec_ts": 1_750_000_298,
         "status": 0, "result": {"ok": True}},
    ]  # fmt: skip
    result = run("submit", "m", "set", "1", "--wait", gateway=gateway)
    assert result.status == 0, result
    assert result.out.splitlines() == [
        "m #7 queued; waiting for the module",
        "m #7 confirmed",
        "  executed at 2025-06-15 15:11:38Z (module clock, 1750000298), status 0 (done), "
        'result {"ok": true}',
    ]


@pytest.mark.parametrize(
    ("outcome", "line"),
    [
        ({"state": "expired", "exec_ts": None, "status": None}, "m #7 expired"),
        ({"state": "confirmed", "exec_ts": 5, "status": 2}, "m #7 confirmed"),
    ],
)
def test_submit_wait_exit_status_when_not_done(
    gateway: SocketGateway, outcome: dict[str, Any], line: str
) -> None:
    gateway.world.handlers["submit"] = lambda c, r: {"module": "m", "iid": 7, "state": "queued"}
    gateway.world.instructions[("m", 7)] = [{"module": "m", "iid": 7, **outcome}]
    result = run("--json", "submit", "m", "set", "--wait", gateway=gateway)
    assert result.status == appcli.EXIT_NOT_DONE
    assert result.json()["state"] == outcome["state"]
    text = run("submit", "m", "set", "--wait", gateway=gateway)
    assert line in text.out.splitlines()


def test_submit_wait_timeout(gateway: SocketGateway) -> None:
    gateway.world.handlers["submit"] = lambda c, r: {"module": "m", "iid": 7, "state": "queued"}
    gateway.world.instructions[("m", 7)] = [{"module": "m", "iid": 7, "state": "queued"}]
    result = run("submit", "m", "set", "--wait", "--wait-timeout", "0.3", gateway=gateway)
    assert_one_line_error(result, "instruction 7 of m is still queued after 0.3 s")


def test_forbidden_is_one_line(gateway: SocketGateway) -> None:
    def forbid(connection: Any, request: dict[str, Any]) -> None:
        raise Refusal("forbidden", f"module {request['module']!r} is not one of yours")

    for op in ("submit", "cancel", "rotate", "approve"):
        gateway.world.handlers[op] = forbid
    assert_one_line_error(
        run("submit", "x", "set", gateway=gateway),
        "forbidden: module 'x' is not one of yours",
    )
    assert_one_line_error(run("cancel", "x", "1", gateway=gateway), "forbidden")
    assert_one_line_error(run("rotate", "x", gateway=gateway), "forbidden")
    assert_one_line_error(run("approve", "x", gateway=gateway), "forbidden")
    assert_one_line_error(run("get", "x", "1", gateway=gateway), "forbidden")


INSTRUCTION = {
    "module": "meter-17",
    "iid": 42,
    "kind": "set",
    "body": {"interval": 60},
    "state": "confirmed",
    "source": "billing",
    "idempotency_key": "ticket-4711",
    "created_at": 1_750_000_000,
    "updated_at": 1_750_000_300,
    "not_after": 1_750_003_600,
    "attempts": 1,
    "exec_ts": 1_750_000_298,
    "status": 0,
    "result": None,
    "history": [
        {"state": "queued", "at": 1_750_000_000},
        {"state": "confirmed", "at": 1_750_000_300},
    ],
}


def test_get_and_cancel(gateway: SocketGateway) -> None:
    gateway.world.instructions[("meter-17", 42)] = [INSTRUCTION]
    gateway.world.handlers["cancel"] = lambda c, r: {**INSTRUCTION, "state": "cancelled"}
    result = run("get", "meter-17", "42", gateway=gateway)
    assert result.status == 0, result
    assert result.out.splitlines() == [
        "meter-17 #42 set: confirmed",
        '  body: {"interval": 60}',
        "  source: billing (idempotency key ticket-4711)",
        "  created 2025-06-15 15:06:40Z, updated 2025-06-15 15:11:40Z, "
        "expires 2025-06-15 16:06:40Z",
        "  attempts: 1",
        "  executed at 2025-06-15 15:11:38Z (module clock, 1750000298), status 0 (done)",
        "  history: queued 2025-06-15 15:06:40Z -> confirmed 2025-06-15 15:11:40Z",
    ]
    assert run("--json", "get", "meter-17", "42", gateway=gateway).json() == INSTRUCTION
    result = run("cancel", "meter-17", "42", gateway=gateway)
    assert result.out.splitlines()[0] == "meter-17 #42 set: cancelled"
    assert gateway.world.requests[-1] == {"id": 2, "op": "cancel", "module": "meter-17", "iid": 42}


def test_modules_reads_every_page(gateway: SocketGateway) -> None:
    def modules(connection: Any, request: dict[str, Any]) -> dict[str, Any]:
        if "module" in request:
            return {
                "module": {
                    "module": request["module"],
                    "status": "enabled",
                    "group": "default",
                    "created_at": 1_749_000_000,
                    "last_hello_ts": 1_750_000_290,
                    "keys": [{"kid": 1, "suite": "p256", "status": "active",
                              "not_after": 1_780_536_100}],
                    "session": None,
                    "pending_instructions": 0,
                }
            }  # fmt: skip
        page = {
            0: ([{"module": "a", "status": "enabled", "group": "g", "last_hello_ts": 0}], 1),
            1: ([{"module": "b", "status": "pending-approval", "group": "g"}], None),
        }[request["offset"]]
        return {"modules": page[0], "next": page[1]}

    gateway.world.handlers["modules"] = modules
    result = run("modules", gateway=gateway)
    assert result.status == 0, result
    assert result.out.splitlines() == [
        "MODULE  STATUS            GROUP  LAST HELLO",
        "a       enabled           g      -",
        "b       pending-approval  g      -",
        "2 modules",
    ]
    listed = run("--json", "modules", gateway=gateway).json()
    assert [m["module"] for m in listed["modules"]] == ["a", "b"]
    shown = run("modules", "meter-17", gateway=gateway)
    assert shown.out.splitlines() == [
        "meter-17: enabled, group default",
        "  created 2025-06-04 01:20:00Z, last HELLO 2025-06-15 15:11:30Z",
        "  session: none",
        "  key 1: active p256, valid until 2026-06-04 01:21:40Z",
        "  pending instructions: 0",
    ]


def test_rotate_approve_refuse(gateway: SocketGateway) -> None:
    world = gateway.world
    world.handlers["rotate"] = lambda c, r: {"module": r["module"], "iid": 43, "state": "queued"}
    world.handlers["approve"] = lambda c, r: {"module": r["module"], "status": "enabled"}
    world.handlers["refuse"] = lambda c, r: {"module": r["module"], "status": "disabled"}
    result = run("rotate", "meter-17", "--params", "2", gateway=gateway)
    assert result.out == "meter-17: key rotation queued as #43 (queued)\n"
    assert world.requests[-1]["params"] == 2
    run("rotate", "meter-17", "--params", "fast-p256", gateway=gateway)
    assert world.requests[-1]["params"] == "fast-p256"
    run("rotate", "meter-17", gateway=gateway)
    assert "params" not in world.requests[-1]
    assert run("approve", "meter-17", gateway=gateway).out == "meter-17: enabled\n"
    assert run("refuse", "meter-17", gateway=gateway).out == "meter-17: disabled\n"


# -- real connection failures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InProcessPKI:
    pki = InProcessPKI(str(tmp_path_factory.mktemp("pki")))
    pki.client("billing")
    return pki


def cert_dir(pki: InProcessPKI, name: str, directory: Path) -> str:
    directory.mkdir()
    cert, key = pki.clients[name]
    shutil.copyfile(cert, directory / f"{name}.pem")
    shutil.copyfile(key, directory / f"{name}-key.pem")
    shutil.copyfile(pki.ca_cert_path, directory / "m2mgw-ca.pem")
    return str(directory)


def test_connection_refused(pki: InProcessPKI, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    certs = cert_dir(pki, "billing", tmp_path / "certs")
    result = run("--gateway", f"127.0.0.1:{port}", "--cert-dir", certs, "modules")
    assert_one_line_error(result, f"connection refused by 127.0.0.1:{port}")


def test_tls_failures_name_the_cause(pki: InProcessPKI, tmp_path: Path) -> None:
    served = SocketGateway(World())
    port = served.listen_tls(
        server_ssl_context(pki.server_cert_path, pki.server_key_path, pki.ca_cert_path)
    )
    try:
        good = cert_dir(pki, "billing", tmp_path / "good")
        gateway = f"127.0.0.1:{port}"
        assert run("--gateway", gateway, "--cert-dir", good, "hello").status == 0

        stranger = InProcessPKI(str(tmp_path))
        stranger.client("billing")
        foreign = cert_dir(stranger, "billing", tmp_path / "foreign")
        result = run("--gateway", gateway, "--cert-dir", foreign, "--ca", pki.ca_cert_path,
                     "hello")  # fmt: skip
        assert_one_line_error(result, "the gateway refused the client certificate")
        result = run("--gateway", gateway, "--cert-dir", good, "--ca", stranger.ca_cert_path,
                     "hello")  # fmt: skip
        assert_one_line_error(result, "the gateway's certificate is not signed by the trusted CA")
        result = run("--gateway", gateway, "--cert-dir", good, "--server-name", "gw.example",
                     "hello")  # fmt: skip
        assert_one_line_error(result, "not valid for 'gw.example'")
    finally:
        served.close()


# -- end to end: the real gateway ------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "gw.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def in_thread(*argv: str) -> Any:
    """``m2mgw-app`` in a thread, so that the reactor keeps serving the gateway."""
    return threads.deferToThread(run, *argv)


@pytest_twisted.ensureDeferred
async def test_tail_receives_a_report_from_a_real_module(workdir: Path) -> None:
    async with real_gateway(workdir) as gw:
        await gw.store.add_modules([Module("meter-e2e", psk=PSK)], apps={"meter-e2e": ["billing"]})
        tail = in_thread(
            "--gateway", gw.app_address, "--cert-dir", gw.certs, "--json",
            "tail", "--event", "report", "--count", "1", "--idle", "30",
        )  # fmt: skip
        endpoint = real_module(gw.datadir, "meter-e2e")
        reading = [{0: "temperature", 1: "Cel", 2: 21.5}]
        woke = await threads.deferToThread(wake, gw.module_port, wake_plan(endpoint, data=reading))
        assert woke.ok, woke
        result: Run = await tail
        assert result.status == 0, result
        (event,) = [json.loads(line) for line in result.out.splitlines()]
        assert event["event"] == "report" and event["module"] == "meter-e2e"
        assert event["payload"]["data"] == [{"n": "temperature", "u": "Cel", "v": 21.5}]
        # tail acknowledged it: the stream stands after it now.
        hello = (await in_thread("--gateway", gw.app_address, "--cert-dir", gw.certs,
                                 "--json", "hello")).json()  # fmt: skip
        assert hello["acked_seq"] >= event["seq"]


@pytest_twisted.ensureDeferred
async def test_submit_wait_returns_the_modules_execution_time(workdir: Path) -> None:
    from twisted.internet import reactor

    async with real_gateway(workdir) as gw:
        await gw.store.add_modules([Module("meter-e2e", psk=PSK)], apps={"meter-e2e": ["billing"]})
        endpoint = real_module(gw.datadir, "meter-e2e")
        assert (await threads.deferToThread(wake, gw.module_port, wake_plan(endpoint))).ok
        before = int(time.time())
        submit = in_thread(
            "--gateway", gw.app_address, "--cert-dir", gw.certs, "--json",
            "submit", "meter-e2e", "set", '{"led": 1}', "--wait", "--wait-timeout", "30",
        )  # fmt: skip
        for _ in range(200):  # until the instruction is queued
            if await gw.store.list_instructions("meter-e2e"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        woke = await threads.deferToThread(
            wake, gw.module_port, wake_plan(endpoint, confirm_now=True)
        )
        assert woke.ok, woke
        result: Run = await submit
        assert result.status == 0, result
        outcome = result.json()
        assert outcome["state"] == "confirmed" and outcome["status"] == 0
        assert before - 5 <= outcome["exec_ts"] <= int(time.time()) + 5
        assert outcome["module"] == "meter-e2e" and outcome["kind"] == "set"
