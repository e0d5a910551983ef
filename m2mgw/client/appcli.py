"""
``m2mgw-app``: an application server on the command line.

It speaks the application protocol (``docs/app-protocol.md``) over mutual TLS
with the files ``m2mgw-admin app-cert issue NAME --out DIR`` wrote::

    m2mgw-app --cert-dir DIR hello                    # who the gateway thinks you are
    m2mgw-app --cert-dir DIR tail                     # stream events, acknowledging them
    m2mgw-app --cert-dir DIR tail --event report --module meter-17 --json
    m2mgw-app --cert-dir DIR submit meter-17 set '{"interval": 60}' --ttl 3600 --wait
    m2mgw-app --cert-dir DIR get meter-17 42
    m2mgw-app --cert-dir DIR cancel meter-17 42
    m2mgw-app --cert-dir DIR modules [meter-17]
    m2mgw-app --cert-dir DIR rotate meter-17 [--params NAME]
    m2mgw-app --cert-dir DIR approve meter-17         # or refuse

Global options go before or after the command: ``--gateway HOST:PORT``
(default ``$M2MGW_APP_GATEWAY`` or ``127.0.0.1:5741``), ``--cert-dir DIR``
(default ``$M2MGW_APP_CERT_DIR``; ``--name`` picks one of several
certificates in it) or ``--cert``/``--key``/``--ca``, ``--server-name``,
``--timeout``, ``--json``.

Exit status: 0 done; 1 a mistake or a failure, reported as one line on
standard error (connection refused, the TLS failure and its likely cause,
the gateway's refusal with its code such as ``forbidden``); 3 ``submit
--wait`` saw the instruction end otherwise than confirmed as done (the
outcome is printed). ``tail`` stops cleanly on Ctrl-C, acknowledging what it
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from m2mgw.admin.output import dumps, dumps_compact, format_table, format_time
from m2mgw.cliargs import ParserExit, RaisingParser, epoch, positive_float, positive_int
from m2mgw.client.app import (
    DEFAULT_PORT,
    AppCredentials,
    AppEvent,
    BlockingAppClient,
)
from m2mgw.client.transport import parse_address
from m2mgw.errors import M2MGWError

__all__ = ["EXIT_NOT_DONE", "PROG", "CommandError", "build_parser", "format_event", "main"]

PROG = "m2mgw-app"
DEFAULT_GATEWAY = f"127.0.0.1:{DEFAULT_PORT}"
ENV_GATEWAY = "M2MGW_APP_GATEWAY"
ENV_CERT_DIR = "M2MGW_APP_CERT_DIR"

#: ``submit --wait``: the instruction ended, but not confirmed as done.
EXIT_NOT_DONE = 3

#: The largest BODY read from a file or standard input.
MAX_BODY_BYTES = 1024 * 1024

#: The modules' status words in a confirmation.
CONFIRMATION_STATUS = {0: "done", 1: "failed", 2: "refused"}

EVENT_KINDS = ("report", "instruction", "key", "module", "alert")


class CommandError(Exception):
    """A mistake or a failure reported as one line, exit status 1."""


class _Parser(RaisingParser):
    """The tool's parser: a malformed command line is a :class:`CommandError`."""

    usage_error = CommandError


# -- argument parsing ------------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text, default_port=DEFAULT_PORT)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _event_kind(text: str) -> str:
    if not text or not text.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event kind ({', '.join(EVENT_KINDS)})"
        )
    return text


def _params_set(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The ``m2mgw-app`` argument parser (global options before or after the command)."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        type=_address,
        default=argparse.SUPPRESS,
        help=f"the gateway's application listener (default: ${ENV_GATEWAY} or {DEFAULT_GATEWAY})",
    )
    group.add_argument(
        "--cert-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"what 'm2mgw-admin app-cert issue NAME --out DIR' wrote (default: ${ENV_CERT_DIR})",
    )
    group.add_argument(
        "--name", default=argparse.SUPPRESS, help="the application, if DIR holds several"
    )
    group.add_argument(
        "--cert", metavar="FILE", default=argparse.SUPPRESS, help="the client certificate (PEM)"
    )
    group.add_argument(
        "--key", metavar="FILE", default=argparse.SUPPRESS, help="its private key (PEM)"
    )
    group.add_argument(
        "--ca",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the gateway's application CA certificate (m2mgw-ca.pem)",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="the name the gateway's certificate must hold (default: the gateway's host)",
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="for connecting and for each answer (default 30)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON (tail: one event per line)",
    )

    parser = _Parser(
        prog=PROG,
        parents=[common],
        description="An application server on the command line: events, instructions, modules.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=text, description=text
        )
        return sub

    sub = command("hello", "who the gateway thinks you are, and where your event stream stands")
    sub.set_defaults(run=cmd_hello)

    sub = command("tail", "stream events, acknowledging them once printed (Ctrl-C stops)")
    sub.add_argument(
        "--module",
        dest="modules",
        action="append",
        metavar="ID",
        help="only events of this module (repeatable)",
    )
    sub.add_argument(
        "--group",
        dest="groups",
        action="append",
        metavar="NAME",
        help="only events of modules in this group (repeatable)",
    )
    sub.add_argument(
        "--event",
        dest="events",
        action="append",
        type=_event_kind,
        metavar="KIND",
        help=f"only events of this kind: {', '.join(EVENT_KINDS)} (repeatable). Events a "
        "filter withholds are acknowledged too",
    )
    sub.add_argument("--count", type=positive_int, metavar="N", help="stop after N events")
    sub.add_argument(
        "--idle", type=positive_float, metavar="SECONDS", help="stop after SECONDS without events"
    )
    sub.add_argument(
        "--no-ack",
        action="store_true",
        help="acknowledge nothing: the events stay for the application's real subscriber",
    )
    sub.set_defaults(run=cmd_tail)

    sub = command("submit", "queue an instruction for a module")
    sub.add_argument("module", metavar="ID", help="the module")
    sub.add_argument("kind", metavar="KIND", help="the instruction's kind (set, config, ...)")
    sub.add_argument(
        "body",
        metavar="BODY",
        nargs="?",
        help="its body as JSON ('-': standard input, @FILE: a file; default null)",
    )
    expiry = sub.add_mutually_exclusive_group()
    expiry.add_argument(
        "--ttl", type=positive_int, metavar="SECONDS", help="expire undelivered after SECONDS"
    )
    expiry.add_argument(
        "--not-after", type=epoch, metavar="EPOCH", help="expire undelivered at this time"
    )
    sub.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a re-submission with the same KEY returns the first instruction",
    )
    sub.add_argument(
        "--wait",
        action="store_true",
        help="wait until it is confirmed (or fails, expires, is cancelled) and print "
        "the module's execution time",
    )
    sub.add_argument(
        "--wait-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="with --wait: give up after SECONDS (default: wait as long as it takes)",
    )
    sub.set_defaults(run=cmd_submit)

    sub = command("get", "an instruction's state and history")
    sub.add_argument("module", metavar="ID")
    sub.add_argument("iid", metavar="IID", type=positive_int)
    sub.set_defaults(run=cmd_get)

    sub = command("cancel", "cancel a queued or sent instruction")
    sub.add_argument("module", metavar="ID")
    sub.add_argument("iid", metavar="IID", type=positive_int)
    sub.set_defaults(run=cmd_cancel)

    sub = command("modules", "the modules you may see, or one of them")
    sub.add_argument("module", metavar="ID", nargs="?")
    sub.set_defaults(run=cmd_modules)

    sub = command("rotate", "ask for a key rotation of a module")
    sub.add_argument("module", metavar="ID")
    sub.add_argument(
        "--params",
        type=_params_set,
        metavar="NAME",
        help="the parameter set, by name or pid (default: the gateway's choice)",
    )
    sub.set_defaults(run=cmd_rotate)

    sub = command("approve", "enable a module pending approval")
    sub.add_argument("module", metavar="ID")
    sub.set_defaults(run=cmd_approve)

    sub = command("refuse", "disable a module pending approval")
    sub.add_argument("module", metavar="ID")
    sub.set_defaults(run=cmd_refuse)
    return parser


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    return getattr(args, name, default)


# -- the context -----------------------------------------------------------------------------------


#: Makes the client for a command (the default connects over TCP and TLS).
ClientFactory = Callable[["Context"], BlockingAppClient]


@dataclass
class Context:
    """What a command works with."""

    args: argparse.Namespace
    stdout: IO[str]
    stderr: IO[str]
    stdin: IO[str] | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    client_factory: ClientFactory | None = None

    @property
    def json(self) -> bool:
        """Print JSON."""
        return bool(_option(self.args, "json", False))

    @property
    def gateway(self) -> tuple[str, int]:
        """The gateway's address."""
        address: tuple[str, int] | None = _option(self.args, "gateway", None)
        if address is not None:
            return address
        text = self.environ.get(ENV_GATEWAY) or DEFAULT_GATEWAY
        try:
            return parse_address(text, default_port=DEFAULT_PORT)
        except ValueError as e:
            raise CommandError(f"${ENV_GATEWAY}: {e}") from None

    def credentials(self) -> AppCredentials:
        """
        The client certificate files, from ``--cert-dir`` and ``--cert``/``--key``/``--ca``.

        :raise CommandError: some are missing.
        """
        cert_dir = _option(self.args, "cert_dir", None) or self.environ.get(ENV_CERT_DIR)
        name = _option(self.args, "name", None)
        base = AppCredentials.from_directory(cert_dir, name) if cert_dir else None
        cert = _option(self.args, "cert", None) or (base.cert_path if base else None)
        key = _option(self.args, "key", None) or (base.key_path if base else None)
        ca = _option(self.args, "ca", None) or (base.ca_path if base else None)
        missing = [o for o, v in (("--cert", cert), ("--key", key), ("--ca", ca)) if not v]
        if missing:
            raise CommandError(
                f"no client certificate: give --cert-dir DIR (what m2mgw-admin app-cert issue "
                f"wrote) or {', '.join(missing)}"
            )
        assert cert is not None and key is not None and ca is not None
        return AppCredentials(cert, key, ca)

    def client(self, on_notice: Callable[[str], None] | None = None) -> BlockingAppClient:
        """A connected client."""
        if self.client_factory is not None:
            client = self.client_factory(self)
        else:
            host, port = self.gateway
            client = BlockingAppClient(
                host,
                port,
                self.credentials(),
                server_name=_option(self.args, "server_name", None),
                timeout=_option(self.args, "timeout", 30.0),
                on_notice=on_notice,
            )
        if not client.connected:
            client.connect()
        return client

    def emit(self, document: Any, lines: Iterable[str]) -> None:
        """Print the result: ``document`` as JSON with ``--json``, else ``lines``."""
        if self.json:
            self.stdout.write(dumps(document) + "\n")
        else:
            for line in lines:
                self.stdout.write(line + "\n")
        self.stdout.flush()


# -- formatting ------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return dumps_compact(value)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def format_senml(records: Any) -> str:
    """SenML JSON records as ``name=value unit, ...`` (other data as compact JSON)."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return _text(records)
    parts = []
    base_name = ""
    base_unit = None
    for record in records:
        base_name = record.get("bn", base_name) if isinstance(record.get("bn", ""), str) else ""
        base_unit = record.get("bu", base_unit)
        name = base_name + str(record.get("n", ""))
        value: Any = None
        for member in ("v", "vs", "vb", "vd", "s"):
            if member in record:
                value = record[member]
                break
        if value is None:
            continue
        unit = record.get("u", base_unit)
        shown = _number(value) if isinstance(value, (int, float)) else _text(value)
        if isinstance(value, bool):
            shown = "true" if value else "false"
        parts.append(f"{name or '?'}={shown}" + (f" {unit}" if unit else ""))
    return ", ".join(parts) if parts else _text(records)


def _status_word(status: Any) -> str:
    if isinstance(status, int) and status in CONFIRMATION_STATUS:
        return f"{status} ({CONFIRMATION_STATUS[status]})"
    return _text(status)


def event_details(event: AppEvent) -> str:
    """The readable part of an event for ``tail``'s table."""
    payload = event.payload
    if event.kind == "report":
        data = payload.get("data")
        text = format_senml(data) if payload.get("format") == "senml" else _text(data)
        module_ts = payload.get("module_ts")
        if isinstance(module_ts, int):
            text += f"  (measured {format_time(module_ts)})"
        return text
    if event.kind == "instruction":
        iid, kind, state = (_text(payload.get(m)) for m in ("iid", "kind", "state"))
        text = f"#{iid} {kind} {state}"
        if payload.get("state") == "confirmed":
            exec_ts = payload.get("exec_ts")
            executed = format_time(exec_ts) if isinstance(exec_ts, int) else "-"
            text += f", executed {executed}, status {_status_word(payload.get('status'))}"
        return text
    if event.kind == "key":
        what = payload.get("event", payload.get("status"))
        if what == "requested":
            return (
                f"rotation requested: keygen #{_text(payload.get('iid'))}, "
                f"params {_text(payload.get('pid'))}, by {_text(payload.get('source'))}"
            )
        text = f"kid {_text(payload.get('kid'))} {_text(what)}"
        facts = []
        if payload.get("status") not in (None, what):
            facts.append(f"now {_text(payload.get('status'))}")
        if payload.get("suite") is not None:
            facts.append(_text(payload.get("suite")))
        if facts:
            text += f" ({', '.join(facts)})"
        if payload.get("reason") is not None:
            text += f": {_text(payload.get('reason'))}"
        return text
    if event.kind == "module":
        text = _text(payload.get("event"))
        facts = []
        if payload.get("group") is not None:
            facts.append(f"group {_text(payload.get('group'))}")
        if payload.get("kid") is not None:
            facts.append(f"key {_text(payload.get('kid'))} {_text(payload.get('suite'))}")
        return text + (f" ({', '.join(facts)})" if facts else "")
    if event.kind == "alert":
        return (
            f"level {_text(payload.get('level'))} code {_text(payload.get('code'))}: "
            f"{_text(payload.get('text'))}"
        )
    if event.kind == "instruction-wanted":
        return f"the module is awake; the gateway waits {_text(event.message.get('wait_ms'))} ms"
    return _text(dict(event.payload) or dict(event.message))


TAIL_HEADER = f"{'SEQ':<7} {'TIME':<20}  {'MODULE':<20} {'EVENT':<12} DETAILS"


def format_event(event: AppEvent, as_json: bool) -> str:
    """One ``tail`` line: the event as received (``as_json``) or a table row."""
    if as_json:
        return json.dumps(dict(event.message), ensure_ascii=False, separators=(",", ":"))
    seq = "-" if event.seq is None else str(event.seq)
    module = event.module or "-"
    return (
        f"{seq:<7} {format_time(event.at):<20}  {module:<20} {event.kind:<12} "
        f"{event_details(event)}"
    ).rstrip()


def _instruction_lines(state: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{_text(state.get('module'))} #{_text(state.get('iid'))} "
        f"{_text(state.get('kind'))}: {_text(state.get('state'))}"
    ]
    if "body" in state:
        lines.append(f"  body: {_text(state.get('body'))}")
    source = f"  source: {_text(state.get('source'))}"
    if state.get("idempotency_key") is not None:
        source += f" (idempotency key {_text(state.get('idempotency_key'))})"
    lines.append(source)
    lines.append(
        f"  created {format_time(state.get('created_at'))}, updated "
        f"{format_time(state.get('updated_at'))}, expires {format_time(state.get('not_after'))}"
    )
    lines.append(f"  attempts: {_text(state.get('attempts'))}")
    if state.get("exec_ts") is not None or state.get("state") == "confirmed":
        lines.append(_execution_line(state))
    history = state.get("history")
    if isinstance(history, list) and history:
        steps = [
            f"{_text(step.get('state'))} {format_time(step.get('at'))}"
            for step in history
            if isinstance(step, dict)
        ]
        lines.append(f"  history: {' -> '.join(steps)}")
    return lines


def _execution_line(state: Mapping[str, Any]) -> str:
    exec_ts = state.get("exec_ts")
    executed = (
        f"{format_time(exec_ts)} (module clock, {exec_ts})" if isinstance(exec_ts, int) else "-"
    )
    line = f"  executed at {executed}, status {_status_word(state.get('status'))}"
    if state.get("result") is not None:
        line += f", result {_text(state.get('result'))}"
    return line


# -- commands --------------------------------------------------------------------------------------


def cmd_hello(ctx: Context) -> int:
    """``hello``: the principal, permissions and event positions."""
    client = ctx.client()
    with client:
        hello = dict(client.hello or {})
    permissions = hello.get("permissions")
    perms = " ".join(permissions) if isinstance(permissions, list) and permissions else "none"
    lines = [
        f"{_text(hello.get('principal'))} at {client.gateway}: "
        f"protocol {_text(hello.get('version'))}",
        f"  permissions: {perms}"
        + (f" (hours {' '.join(hello['hours'])})" if isinstance(hello.get("hours"), list) else ""),
        f"  events: acknowledged up to {_text(hello.get('acked_seq'))}, "
        f"last {_text(hello.get('last_seq'))}",
    ]
    ctx.emit(hello, lines)
    return 0


def cmd_tail(ctx: Context) -> int:
    """``tail``: print events as they come, acknowledging each once printed."""
    args = ctx.args
    stderr = ctx.stderr

    def notice(text: str) -> None:
        stderr.write(f"{PROG}: {text}\n")
        stderr.flush()

    client = ctx.client(on_notice=notice)
    acknowledge = not args.no_ack
    shown = 0
    try:
        client.subscribe(modules=args.modules, groups=args.groups, events=args.events)
        if not ctx.json:
            ctx.stdout.write(TAIL_HEADER + "\n")
            ctx.stdout.flush()
        for event in client.events(auto_ack=False, timeout=args.idle):
            try:
                ctx.stdout.write(format_event(event, ctx.json) + "\n")
                ctx.stdout.flush()
            except BrokenPipeError:
                break
            if acknowledge and event.seq is not None:
                client.mark_processed(event.seq)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _read_body(text: str | None, stdin: IO[str] | None) -> Any:
    if text is None:
        return None
    where = "BODY"
    if text == "-":
        stream = stdin if stdin is not None else sys.stdin
        text = stream.read(MAX_BODY_BYTES + 1)
        where = "standard input"
    elif text.startswith("@"):
        path = text[1:]
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BODY_BYTES + 1)
        except OSError as e:
            raise CommandError(f"{path}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not UTF-8 text") from None
        where = path
    if len(text) > MAX_BODY_BYTES:
        raise CommandError(f"{where}: larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError as e:
        raise CommandError(
            f"{where} is not JSON ({e}); a text body needs quotes: '\"on\"'"
        ) from None


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def cmd_submit(ctx: Context) -> int:
    """``submit``: queue an instruction; with ``--wait``, wait for its outcome."""
    args = ctx.args
    body = _read_body(args.body, ctx.stdin)
    client = ctx.client()
    with client:
        result = client.submit(
            args.module,
            args.kind,
            body,
            ttl=args.ttl,
            not_after=args.not_after,
            idempotency_key=args.idempotency_key,
        )
        iid = result.get("iid")
        line = f"{args.module} #{_text(iid)} {_text(result.get('state'))}"
        if not args.wait:
            ctx.emit(result, [line])
            return 0
        if not isinstance(iid, int):
            raise CommandError("the gateway's answer has no iid to wait for")
        if not ctx.json:
            ctx.stdout.write(line + "; waiting for the module\n")
            ctx.stdout.flush()
        outcome = client.wait_for_outcome(args.module, iid, timeout=args.wait_timeout)
    state = outcome.get("state")
    done = state == "confirmed" and outcome.get("status") == 0
    lines = [f"{args.module} #{iid} {_text(state)}"]
    if state == "confirmed":
        lines.append(_execution_line(outcome))
    ctx.emit(outcome, lines)
    return 0 if done else EXIT_NOT_DONE


def cmd_get(ctx: Context) -> int:
    """``get``: an instruction's state and history."""
    with ctx.client() as client:
        state = client.request("get", module=ctx.args.module, iid=ctx.args.iid)
    ctx.emit(state, _instruction_lines(state))
    return 0


def cmd_cancel(ctx: Context) -> int:
    """``cancel``: cancel an instruction."""
    with ctx.client() as client:
        state = client.request("cancel", module=ctx.args.module, iid=ctx.args.iid)
    ctx.emit(state, _instruction_lines(state))
    return 0


def cmd_modules(ctx: Context) -> int:
    """``modules``: list the modules you may see (every page), or show one."""
    module_id = ctx.args.module
    with ctx.client() as client:
        if module_id is not None:
            result = client.request("modules", module=module_id)
        else:
            modules: list[Any] = []
            offset: Any = 0
            while offset is not None:
                page = client.request("modules", offset=offset, limit=1000)
                entries = page.get("modules")
                modules.extend(entries if isinstance(entries, list) else [])
                following = page.get("next")
                offset = following if isinstance(following, int) and following > offset else None
            result = {"modules": modules}
    if module_id is not None:
        ctx.emit(result, _module_lines(result.get("module")))
        return 0
    rows = [
        [
            _text(m.get("module")),
            _text(m.get("status")),
            _text(m.get("group")),
            format_time(m.get("last_hello_ts")),
        ]
        for m in result["modules"]
        if isinstance(m, dict)
    ]
    lines = format_table(["MODULE", "STATUS", "GROUP", "LAST HELLO"], rows) if rows else []
    lines.append(f"{len(rows)} module{'' if len(rows) == 1 else 's'}")
    ctx.emit(result, lines)
    return 0


def _module_lines(module: Any) -> list[str]:
    if not isinstance(module, dict):
        return [_text(module)]
    lines = [
        f"{_text(module.get('module'))}: {_text(module.get('status'))}, "
        f"group {_text(module.get('group'))}",
        f"  created {format_time(module.get('created_at'))}, last HELLO "
        f"{format_time(module.get('last_hello_ts'))}",
    ]
    session = module.get("session")
    if isinstance(session, dict):
        lines.append(
            f"  session: kid {_text(session.get('kid'))} {_text(session.get('suite'))}, "
            f"expires {format_time(session.get('expires_at'))}"
        )
    else:
        lines.append("  session: none")
    keys = module.get("keys")
    if isinstance(keys, list):
        for key in keys:
            if isinstance(key, dict):
                lines.append(
                    f"  key {_text(key.get('kid'))}: {_text(key.get('status'))} "
                    f"{_text(key.get('suite'))}, valid until {format_time(key.get('not_after'))}"
                )
    if module.get("pending_instructions") is not None:
        lines.append(f"  pending instructions: {_text(module.get('pending_instructions'))}")
    return lines


def cmd_rotate(ctx: Context) -> int:
    """``rotate``: queue a key rotation."""
    params: dict[str, Any] = {"module": ctx.args.module}
    if ctx.args.params is not None:
        params["params"] = ctx.args.params
    with ctx.client() as client:
        result = client.request("rotate", **params)
    ctx.emit(
        result,
        [
            f"{ctx.args.module}: key rotation queued as #{_text(result.get('iid'))} "
            f"({_text(result.get('state'))})"
        ],
    )
    return 0


def _decide(ctx: Context, op: str) -> int:
    with ctx.client() as client:
        result = client.request(op, module=ctx.args.module)
    ctx.emit(result, [f"{ctx.args.module}: {_text(result.get('status'))}"])
    return 0


def cmd_approve(ctx: Context) -> int:
    """``approve``: enable a module pending approval."""
    return _decide(ctx, "approve")


def cmd_refuse(ctx: Context) -> int:
    """``refuse``: disable a module pending approval."""
    return _decide(ctx, "refuse")


# -- entry point -----------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    client_factory: ClientFactory | None = None,
) -> int:
    """
    The console script.

    :param environ: the environment (default ``os.environ``).
    :param client_factory: makes the client instead of TCP + TLS (tests).
    :return: the exit status: 0 done, 1 a mistake or a failure (one line on
        stderr), 3 ``submit --wait`` saw the instruction not done.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except CommandError as e:
        stderr.write(f"{PROG}: error: {e}\n")
        return 1
    except ParserExit as e:
        return e.status
    ctx = Context(
        args,
        stdout,
        stderr,
        stdin,
        environ if environ is not None else os.environ,
        client_factory,
    )
    try:
        status: int = args.run(ctx)
    except (CommandError, M2MGWError, OSError, ValueError) as e:
        stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return 1
    except Exception:
        stderr.write(f"{PROG}: internal error (please report it):\n{traceback.format_exc()}")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
