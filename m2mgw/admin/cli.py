"""
``m2mgw-admin``: the operator's command line.

It reads the gateway's configuration (``--config``, default
``etc/m2mgw.conf`` if present) and works on the same data directory and
store, so it can run while the gateway runs: every store change is one short
transaction.  Each command prints text for people, or one JSON document with
``--json``.  A mistake is reported as one line on stderr with exit status 1
(2 for a malformed command line); only a bug prints a traceback.

:func:`main` is the console script: it parses the command line and runs the
command under :func:`twisted.internet.task.react`.  :func:`run` does the same
on a reactor that is already running, which is how the tests call it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import os
import pathlib
import re
import secrets
import shutil
import sqlite3
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react

from m2mgw import __version__
from m2mgw.admin import OperatorError
from m2mgw.admin import output as out
from m2mgw.admin.csvimport import COLUMNS, parse_module_csv
from m2mgw.admin.instructions import body_from_json, new_operator_instruction
from m2mgw.admin.provisioning import (
    PSK_LENGTHS,
    check_app_names,
    check_group,
    check_module_id,
    parse_kid,
    parse_psk,
    parse_public_key,
)
from m2mgw.cliargs import ParserExit, RaisingParser, positive_int
from m2mgw.config import DEFAULT_CONFIG_PATH, GatewayConfig, load_config
from m2mgw.datadir import DataDir, gateway_tls_names, register_server_keys
from m2mgw.errors import (
    DuplicateModule,
    ImportFailed,
    InvalidTransition,
    M2MGWError,
    UnknownInstruction,
    UnknownKey,
    UnknownModule,
)
from m2mgw.instructions.submission import REPLY_OVERHEAD
from m2mgw.interfaces import ICipherSuite, IModuleStore, IModuleStoreFactory
from m2mgw.keys import server_rollover as rollover
from m2mgw.keys.params import ParameterSet, default_set, find_set
from m2mgw.keys.rotation import params_for_key, request_rotation, retire_suite
from m2mgw.protocol import cbor
from m2mgw.records import (
    PENDING_INSTRUCTION_STATES,
    VOUCHED_BY_OPERATOR,
    VOUCHED_BY_PSK,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    SecurityEvent,
    ServerKey,
)
from m2mgw.registry import lookup
from m2mgw.store import postgres as postgres_store
from m2mgw.store import sqlite as sqlite_store
from m2mgw.store.postgres import PostgresStore
from m2mgw.store.sqlite import SQLiteStore

__all__ = ["build_parser", "main", "run"]

PROG = "m2mgw-admin"

#: Modules fetched per store call by ``module list``.
PAGE_SIZE = 1000

#: Generated PSKs are this long (MGP/1 §4 allows 16-64 bytes).
GENERATED_PSK_BYTES = 32


# -- the command line ------------------------------------------------------------------------


class UsageError(Exception):
    """The command line is malformed (exit status 2)."""


class _Parser(RaisingParser):
    """The tool's parser: a malformed command line is a :class:`UsageError` (exit 2)."""

    usage_error = UsageError
    prefix_prog = True


def _non_negative_int(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``m2mgw-admin`` argument parser (global options work before or after the command)."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"the gateway's configuration (default: {DEFAULT_CONFIG_PATH} if present)",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the data directory (overrides [gateway] data_dir)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document instead of text",
    )

    parser = _Parser(
        prog=PROG,
        parents=[common],
        description="Operate an m2mgw gateway: keys, modules, instructions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        where: Any, name: str, handler: Callable[..., Awaitable[None]], text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = where.add_parser(
            name, parents=[common], help=text, description=text
        )
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "init", cmd_init, "create the data directory and keys if missing")

    server_key = commands.add_parser("server-key", help="the gateway's module-side keys")
    server_key_commands = server_key.add_subparsers(metavar="ACTION", required=True)
    sub = command(server_key_commands, "show", cmd_server_key_show, "show the server keys")
    sub.add_argument("--suite", help="only this suite's keys")
    command(
        server_key_commands,
        "list",
        cmd_server_key_list,
        "every server key with its status, deadline and announcement progress",
    )
    sub = command(
        server_key_commands,
        "add",
        cmd_server_key_add,
        "create one more server key for a suite (rollover: a new skid)",
    )
    sub.add_argument("--suite", required=True, help="the suite of the new key")
    sub = command(
        server_key_commands,
        "announce",
        cmd_server_key_announce,
        "tell every module of the key's suite about it (an skey instruction each)",
    )
    sub.add_argument("skid", metavar="SKID", type=_non_negative_int)
    sub.add_argument(
        "--batch",
        type=positive_int,
        default=100,
        metavar="N",
        help="store operations in flight at once (default 100)",
    )
    sub = command(
        server_key_commands,
        "retire",
        cmd_server_key_retire,
        "retire SKID once the modules told about its successor have confirmed",
    )
    sub.add_argument("skid", metavar="SKID", type=_non_negative_int)
    sub.add_argument(
        "--deadline",
        type=positive_int,
        metavar="EPOCH",
        help="retire it at this time at the latest, confirmed or not",
    )
    sub.add_argument(
        "--force",
        action="store_true",
        help="even if no module was told about a successor",
    )

    gateway_cert = commands.add_parser(
        "gateway-cert", help="the gateway's TLS certificate for application servers"
    )
    gateway_cert_commands = gateway_cert.add_subparsers(metavar="ACTION", required=True)
    sub = command(
        gateway_cert_commands,
        "renew",
        cmd_gateway_cert_renew,
        "replace the gateway's TLS key and certificate (then send the gateway SIGHUP)",
    )
    sub.add_argument(
        "--days", type=positive_int, default=825, help="validity in days (default 825)"
    )

    module = commands.add_parser("module", help="provision and manage modules")
    module_commands = module.add_subparsers(metavar="ACTION", required=True)
    sub = command(module_commands, "add", cmd_module_add, "provision one module")
    sub.add_argument("module_id", metavar="ID", help="the module identity (1-64 bytes of UTF-8)")
    psk = sub.add_mutually_exclusive_group()
    low, high = PSK_LENGTHS
    psk.add_argument("--psk", metavar="HEX", help=f"the pre-shared key, {low}-{high} bytes as hex")
    psk.add_argument(
        "--generate-psk",
        action="store_true",
        help=f"generate a {GENERATED_PSK_BYTES}-byte PSK and print it (once)",
    )
    sub.add_argument(
        "--public-key",
        metavar="FILE",
        help="the module's public key: PEM or DER SubjectPublicKeyInfo, raw wire bytes, or hex",
    )
    sub.add_argument("--kid", type=positive_int, help="the public key's id (1 or more)")
    sub.add_argument("--suite", help="the public key's cipher suite")
    sub.add_argument("--group", default="default", help="the module's group (default: default)")
    sub.add_argument(
        "--pending-approval",
        action="store_true",
        help="authenticate it but hold instructions and data until 'module approve'",
    )
    sub.add_argument(
        "--keep-psk",
        action="store_true",
        help="keep accepting the PSK once a key is active (default: single use)",
    )
    sub.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="APP",
        help="an application server the module's events go to (repeatable)",
    )

    command(module_commands, "list", cmd_module_list, "list every module")
    sub = command(module_commands, "show", cmd_module_show, "show one module")
    sub.add_argument("module_id", metavar="ID")
    sub = command(
        module_commands, "disable", cmd_module_disable, "refuse a module (ends its session)"
    )
    sub.add_argument("module_id", metavar="ID")
    sub = command(module_commands, "enable", cmd_module_enable, "enable (or approve) a module")
    sub.add_argument("module_id", metavar="ID")
    sub = command(
        module_commands,
        "approve",
        cmd_module_approve,
        "approve a module waiting for approval: its held data and queued work flow",
    )
    sub.add_argument("module_id", metavar="ID")
    sub = command(
        module_commands,
        "refuse",
        cmd_module_refuse,
        "refuse a module waiting for approval (it is disabled)",
    )
    sub.add_argument("module_id", metavar="ID")
    sub = command(module_commands, "keys", cmd_module_keys, "the module's key series")
    sub.add_argument("module_id", metavar="ID")
    sub = command(
        module_commands,
        "revoke-key",
        cmd_module_revoke_key,
        "revoke one key of a module (its sessions end at once)",
    )
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument("kid", metavar="KID", type=positive_int)
    sub = command(
        module_commands, "rotate", cmd_module_rotate, "ask a module to rotate its key (keygen)"
    )
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument(
        "--params",
        metavar="NAME",
        help="the parameter set (name or pid; default: the module's policy)",
    )
    sub = command(
        module_commands,
        "apps",
        cmd_module_apps,
        "set (or, without APP, show) the applications a module belongs to",
    )
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument("apps", metavar="APP", nargs="*", help="application principals")
    sub.add_argument("--none", action="store_true", help="the module belongs to no application")
    sub = command(
        module_commands,
        "import",
        cmd_module_import,
        "provision modules from a CSV file, all or none",
    )
    sub.add_argument("file", metavar="FILE.csv", help=f"columns: {', '.join(COLUMNS)}")

    group_parser = commands.add_parser("group", help="groups of modules")
    group_commands = group_parser.add_subparsers(metavar="ACTION", required=True)
    sub = command(
        group_commands,
        "apps",
        cmd_group_apps,
        "set the applications of every module of a group (one transaction)",
    )
    sub.add_argument("group_name", metavar="GROUP")
    sub.add_argument("apps", metavar="APP", nargs="+", help="application principals")

    suite = commands.add_parser("suite", help="the cipher suites modules use")
    suite_commands = suite.add_subparsers(metavar="ACTION", required=True)
    sub = command(
        suite_commands,
        "retire",
        cmd_suite_retire,
        "move every module whose active key is of SUITE to a key of another suite",
    )
    sub.add_argument("suite_name", metavar="SUITE")
    sub.add_argument("--to", required=True, metavar="SUITE", help="the suite of the new keys")
    sub.add_argument(
        "--params", metavar="NAME", help="a parameter set of that suite (default: its default)"
    )

    app_cert = commands.add_parser("app-cert", help="application server certificates")
    app_cert_commands = app_cert.add_subparsers(metavar="ACTION", required=True)
    sub = command(
        app_cert_commands, "issue", cmd_app_cert_issue, "issue a client certificate for NAME"
    )
    sub.add_argument("name", metavar="NAME", help="the application's principal name")
    sub.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    sub.add_argument(
        "--days", type=positive_int, default=825, help="validity in days (default 825)"
    )

    instruction = commands.add_parser("instruction", help="the modules' instruction queues")
    instruction_commands = instruction.add_subparsers(metavar="ACTION", required=True)
    sub = command(instruction_commands, "submit", cmd_instruction_submit, "queue an instruction")
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument("kind", metavar="KIND", help="e.g. set, config, sleep, rehello")
    sub.add_argument("body", metavar="BODY_JSON", nargs="?", help="the body as JSON (default null)")
    expiry = sub.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=positive_int, metavar="SECONDS", help="expire after")
    expiry.add_argument("--not-after", type=positive_int, metavar="EPOCH", help="expire at")
    sub.add_argument(
        "--idempotency-key", metavar="KEY", help="submitting the same key again queues nothing"
    )
    sub = command(instruction_commands, "list", cmd_instruction_list, "list instructions")
    sub.add_argument("module_id", metavar="ID", nargs="?")
    sub.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in InstructionState],
        help="only this state (repeatable)",
    )
    sub.add_argument("--limit", type=positive_int, default=1000, help="at most (default 1000)")
    sub = command(
        instruction_commands, "cancel", cmd_instruction_cancel, "cancel a queued or sent one"
    )
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument("iid", metavar="IID", type=_non_negative_int)

    sub = command(
        commands, "security-events", cmd_security_events, "list security events and audit entries"
    )
    sub.add_argument(
        "--since",
        metavar="T",
        default="0",
        help="epoch seconds, an ISO 8601 time, or an age such as 90m, 12h, 7d",
    )
    sub.add_argument("--limit", type=positive_int, default=1000, help="at most (default 1000)")

    db = commands.add_parser("db", help="the module database's schema")
    db_commands = db.add_subparsers(metavar="ACTION", required=True)
    command(
        db_commands,
        "status",
        cmd_db_status,
        "the store, its schema level shipped and in the database, and pending migrations",
    )
    command(db_commands, "migrate", cmd_db_migrate, "apply the pending schema migrations")
    return parser


# -- running a command -----------------------------------------------------------------------------


class Context:
    """
    What a command works with: the configuration, the data directory, the
    store (opened on first use), the clock and the output streams.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        reactor: Any,
        stdout: IO[str],
        stderr: IO[str],
        clock: Callable[[], float],
    ) -> None:
        self.args = args
        self.reactor = reactor
        self.stdout = stdout
        self.stderr = stderr
        self.clock = clock
        self.json: bool = getattr(args, "json", False)
        overrides = {}
        if getattr(args, "data_dir", None) is not None:
            overrides["gateway.data_dir"] = args.data_dir
        self.config: GatewayConfig = load_config(getattr(args, "config", None), overrides)
        self.datadir = DataDir(self.config.data_dir, clock)
        self._store: IModuleStore | None = None

    def now(self) -> int:
        """The current time in whole seconds."""
        return int(self.clock())

    @property
    def actor(self) -> str:
        """Who is acting, for audit entries: ``operator:<login name>``."""
        try:
            return f"operator:{getpass.getuser()}"
        except Exception:  # no login name in a container: still audit the action
            return "operator"

    async def store(self) -> IModuleStore:
        """The configured store, opened (and later closed by :func:`execute`)."""
        if self._store is None:
            factory = lookup(IModuleStoreFactory, self.config.store.backend)
            if self.config.store.backend == "memory":
                raise OperatorError(
                    "the configured store is 'memory', which keeps nothing between processes;"
                    " m2mgw-admin needs the gateway's persistent store"
                )
            store = factory.create(self.config.store.options, self.config.data_dir, self.reactor)
            await store.open()
            self._store = store
        return self._store

    async def close(self) -> None:
        """Close the store if it was opened."""
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    async def audit(self, reason: str, module_id: str | None = None, detail: str = "") -> None:
        """Record an audit entry for an operator action."""
        store = await self.store()
        event = SecurityEvent(
            at=self.now(),
            category="audit",
            reason=reason,
            source=self.actor,
            claimed_id=module_id,
            detail=detail,
        )
        await store.record_security_events([event])

    def emit(self, document: Any, lines: Sequence[str]) -> None:
        """Print the result: ``document`` as JSON with ``--json``, else ``lines``."""
        if self.json:
            self.stdout.write(out.dumps(document) + "\n")
        else:
            for line in lines:
                self.stdout.write(line + "\n")

    def suite(self, name: str) -> Any:
        """A cipher suite by name (an unknown one lists the known ones)."""
        return lookup(ICipherSuite, name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "failed"


def _error_message(error: BaseException) -> str:
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return _one_line(str(error))


def parse(argv: Sequence[str], stderr: IO[str]) -> argparse.Namespace | int:
    """
    Parse a command line.

    :return: the arguments, or the exit status if parsing ended it
        (``--help``: 0, a usage error: 2, reported on ``stderr``).
    """
    try:
        return build_parser().parse_args(list(argv))
    except UsageError as e:
        stderr.write(f"{e}\n")
        return 2
    except ParserExit as e:
        return e.status


async def execute(
    args: argparse.Namespace,
    reactor: Any,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """
    Run the parsed command on a running reactor.

    :return: the exit status (0 done, 1 refused or failed).
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    context: Context | None = None
    try:
        context = Context(args, reactor, stdout, stderr, clock)
        await args.handler(context)
    except (OperatorError, M2MGWError, OSError) as e:
        stderr.write(f"{PROG}: error: {_error_message(e)}\n")
        return 1
    except Exception:
        stderr.write(f"{PROG}: internal error (please report it):\n{traceback.format_exc()}")
        return 1
    finally:
        if context is not None:
            try:
                await context.close()
            except Exception as e:  # the result stands; say the close failed
                stderr.write(f"{PROG}: warning: closing the store failed: {_one_line(str(e))}\n")
    stdout.flush()
    return 0


async def run(
    argv: Sequence[str],
    reactor: Any,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """
    Parse ``argv`` and run the command on a running reactor (the in-process
    form of :func:`main`).

    :return: the exit status.
    """
    stderr = stderr if stderr is not None else sys.stderr
    args = parse(argv, stderr)
    if isinstance(args, int):
        return args
    return await execute(args, reactor, stdout=stdout, stderr=stderr, clock=clock)


def main(argv: Sequence[str] | None = None) -> int:
    """
    The console script: parse, then run the command under a reactor.

    :return: the exit status (``sys.exit`` it).
    """
    args = parse(sys.argv[1:] if argv is None else argv, sys.stderr)
    if isinstance(args, int):
        return args

    def start(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            status = await execute(args, reactor)
            if status:
                raise SystemExit(status)

        return ensureDeferred(go())

    try:
        react(start)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


# -- commands --------------------------------------------------------------------------------------


async def cmd_init(ctx: Context) -> None:
    """``init``: create the data directory, keys and database if missing (idempotent)."""
    config = ctx.config
    result = ctx.datadir.ensure(
        config.suites,
        config.apps.key_type,
        config.apps.rsa_bits,
        tls_names=gateway_tls_names(config.node_name, config.apps.address),
    )
    store = await ctx.store()
    registered = await register_server_keys(store, ctx.datadir.server_key_records(config.suites))
    version = await store.schema_version()
    info = ctx.datadir.tls_certificate_info()

    def item(entry: Any) -> dict[str, str]:
        return {"kind": entry.kind, "path": entry.path, "detail": entry.detail}

    document = {
        "data_dir": ctx.datadir.path,
        "created": [item(e) for e in result.created],
        "existing": [item(e) for e in result.existing],
        "store": {
            "backend": config.store.backend,
            "schema_version": version,
            "server_keys_registered": [r.skid for r in registered],
        },
        "tls": info,
    }
    rows = [("created", e.kind, e.detail, e.path) for e in result.created]
    rows += [("exists", e.kind, e.detail, e.path) for e in result.existing]
    lines = [f"data directory {ctx.datadir.path}"]
    lines += ["  " + line for line in out.format_table(("", "WHAT", "", "PATH"), rows)[1:]]
    registered_text = ", ".join(str(r.skid) for r in registered) or "none new"
    lines.append(
        f"store {config.store.backend} (schema {version}); server keys registered: "
        f"{registered_text}"
    )
    lines.append(f"application servers trust {info['ca_certificate']}")
    ctx.emit(document, lines)


async def cmd_server_key_show(ctx: Context) -> None:
    """``server-key show``: the module-side server keys with their store status."""
    suites = [ctx.args.suite] if ctx.args.suite else None
    if ctx.args.suite:
        ctx.suite(ctx.args.suite)  # an unknown name lists the known ones
    records = ctx.datadir.server_key_records(suites)
    store = await ctx.store()
    statuses = {k.skid: k.status.value for k in await store.list_server_keys()}
    keys = [out.server_key_json(r, statuses.get(r.skid, "unregistered")) for r in records]
    rows = []
    for key in keys:
        public = (
            key["public"]
            if key["sig_public"] is None
            else f"{key['public']} sig {key['sig_public']}"
        )
        rows.append((key["skid"], key["suite"], key["status"], public))
    lines = out.format_table(("SKID", "SUITE", "STATUS", "PUBLIC KEY"), rows) if rows else []
    if not rows:
        lines = ["no server keys (run m2mgw-admin init)"]
    ctx.emit({"server_keys": keys}, lines)


async def _server_key(store: IModuleStore, skid: int) -> ServerKey:
    for key in await store.list_server_keys():
        if key.skid == skid:
            found: ServerKey = key
            return found
    raise OperatorError(f"no server key with skid {skid} (see m2mgw-admin server-key list)")


async def cmd_server_key_list(ctx: Context) -> None:
    """``server-key list``: every server key, its status, deadline and announcement."""
    store = await ctx.store()
    records = {key.skid: key for key in await store.list_server_keys()}
    files = dict(ctx.datadir.server_key_files())
    keys = []
    rows = []
    for skid in sorted(set(records) | set(files)):
        record = records.get(skid)
        if record is None:
            entry: dict[str, Any] = {"skid": skid, "suite": files[skid], "status": "unregistered"}
            entry.update(retire_after=None, announcement=None)
        else:
            entry = out.server_key_json(record)
            entry["retire_after"] = record.retire_after
            entry["announcement"] = await rollover.announcement_progress(store, skid)
        entry["file"] = skid in files
        keys.append(entry)
        told = entry["announcement"]
        progress = "-"
        if told and any(told.values()):
            progress = " ".join(f"{state} {n}" for state, n in told.items() if n)
        rows.append(
            (
                skid,
                entry["suite"],
                entry["status"],
                out.format_time(entry["retire_after"]),
                progress,
                "yes" if entry["file"] else "MISSING",
            )
        )
    headers = ("SKID", "SUITE", "STATUS", "RETIRE AFTER", "ANNOUNCEMENT", "FILE")
    lines = out.format_table(headers, rows) if rows else ["no server keys (run m2mgw-admin init)"]
    ctx.emit({"server_keys": keys}, lines)


async def cmd_server_key_add(ctx: Context) -> None:
    """``server-key add``: a new server key of a suite, in the data directory and the store."""
    suite = ctx.args.suite
    ctx.suite(suite)  # an unknown name lists the known ones
    if suite not in ctx.config.suites:
        raise OperatorError(
            f"suite {suite} is not served ([gateway] suites: {', '.join(ctx.config.suites)})"
        )
    store = await ctx.store()
    record = ctx.datadir.add_server_key(suite)
    await store.add_server_key(record)
    await ctx.audit("server-key-added", None, f"skid {record.skid} suite {suite}")
    interval = int(ctx.config.jobs.server_key_interval)
    ctx.emit(
        {"server_key": out.server_key_json(record)},
        [
            f"added server key {record.skid} ({suite})",
            f"the gateway accepts it after SIGHUP (or within {interval} s); then tell the"
            f" modules: m2mgw-admin server-key announce {record.skid}",
        ],
    )


async def cmd_server_key_announce(ctx: Context) -> None:
    """``server-key announce``: an skey instruction for every module of the key's suite."""
    config = ctx.config
    store = await ctx.store()
    key = await _server_key(store, ctx.args.skid)
    if key.suite not in config.suites:
        raise OperatorError(f"skid {key.skid} is of suite {key.suite}, which is not served")
    loaded = ctx.datadir.server_keys(config.suites)
    if key.skid not in {pair.skid for pair in loaded}:
        raise OperatorError(f"skid {key.skid} has no key file in {ctx.datadir.keys_dir}")
    allowance = rollover.signature_allowance([ctx.suite(n) for n in config.suites], loaded)
    progress = out.Progress(ctx.stderr, await store.count_modules(), "announcing")
    try:
        result = await rollover.announce(
            store,
            key,
            allowance,
            ctx.now(),
            batch=ctx.args.batch,
            progress=lambda told, skipped: progress.update(told + skipped),
        )
    except rollover.RolloverRefused as e:
        raise OperatorError(str(e)) from None
    finally:
        progress.finish()
    detail = f"skid {key.skid}: {result.told} modules told, {result.skipped} left out"
    await ctx.audit("server-key-announced", None, detail)
    ctx.emit(
        {
            "skid": key.skid,
            "told": result.told,
            "skipped": result.skipped,
            "announcement": await rollover.announcement_progress(store, key.skid),
        },
        [
            f"server key {key.skid} ({key.suite}): {result.told} modules told,"
            f" {result.skipped} left out (disabled, or of another suite)"
        ],
    )


async def cmd_server_key_retire(ctx: Context) -> None:
    """``server-key retire``: the key becomes retiring, and retired once its modules moved."""
    store = await ctx.store()
    try:
        key = await rollover.begin_retirement(
            store, ctx.args.skid, ctx.now(), deadline=ctx.args.deadline, force=ctx.args.force
        )
    except rollover.RolloverRefused as e:
        raise OperatorError(str(e)) from None
    deadline = out.format_time(key.retire_after)
    await ctx.audit("server-key-retiring", None, f"skid {key.skid}, deadline {deadline}")
    document = out.server_key_json(key)
    document["retire_after"] = key.retire_after
    ctx.emit(
        document,
        [
            f"server key {key.skid} ({key.suite}) is retiring: still accepted, retired once"
            " every module told about its successor has confirmed"
            + ("" if key.retire_after is None else f", or at {deadline}")
        ],
    )


async def cmd_gateway_cert_renew(ctx: Context) -> None:
    """``gateway-cert renew``: a new TLS key and certificate for the gateway."""
    config = ctx.config
    cert_path = ctx.datadir.renew_gateway_certificate(
        config.apps.key_type,
        config.apps.rsa_bits,
        tls_names=gateway_tls_names(config.node_name, config.apps.address),
        days=ctx.args.days,
    )
    info = ctx.datadir.tls_certificate_info()
    await ctx.audit("gateway-cert-renewed", None, f"until {info['gateway_not_after']}")
    ctx.emit(
        {"certificate": cert_path, "not_after": info["gateway_not_after"]},
        [
            f"renewed {cert_path}, valid until {out.format_time(info['gateway_not_after'])}",
            "send the gateway SIGHUP: new connections get the new certificate",
        ],
    )


def _read_user_file(path: str, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise OperatorError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise OperatorError(f"{what} {path} is larger than {limit} bytes")
    return data


async def cmd_module_add(ctx: Context) -> None:
    """``module add``: provision one module with a PSK and/or a public key."""
    args = ctx.args
    module_id = check_module_id(args.module_id)
    group = check_group(args.group)
    apps = check_app_names(args.app)
    generated = False
    psk: bytes | None = None
    if args.generate_psk:
        psk, generated = secrets.token_bytes(GENERATED_PSK_BYTES), True
    elif args.psk is not None:
        psk = parse_psk(args.psk)
    key_options = (args.public_key, args.kid, args.suite)
    key: ModuleKey | None = None
    now = ctx.now()
    if any(option is not None for option in key_options):
        if None in key_options:
            raise OperatorError("--public-key, --kid and --suite go together")
        suite = ctx.suite(args.suite)
        data = _read_user_file(args.public_key, 64 * 1024, "public key file")
        try:
            public = parse_public_key(data, suite)
        except OperatorError as e:
            raise OperatorError(f"{args.public_key}: {e}") from None
        key = ModuleKey(
            module_id=module_id,
            kid=parse_kid(args.kid),
            suite=args.suite,
            public=public,
            status=KeyStatus.ACTIVE,
            vouched_by=VOUCHED_BY_OPERATOR,
            created_at=now,
            activated_at=now,
        )
    if psk is None and key is None:
        raise OperatorError("give the module a PSK (--psk or --generate-psk) or --public-key")
    status = ModuleStatus.PENDING_APPROVAL if args.pending_approval else ModuleStatus.ENABLED
    if args.keep_psk and psk is None:
        raise OperatorError("--keep-psk needs a PSK (--psk or --generate-psk)")
    module = Module(
        module_id=module_id,
        status=status,
        psk=psk,
        psk_reusable=args.keep_psk,
        group=group,
        created_at=now,
    )
    store = await ctx.store()
    try:
        await store.add_modules(
            [module], [key] if key is not None else [], {module_id: apps} if apps else None
        )
    except DuplicateModule:
        raise OperatorError(f"module {module_id!r} already exists") from None
    detail = f"status {status.value}, psk {'yes' if psk else 'no'}"
    if module.psk_reusable:
        detail += " (reusable)"
    if key is not None:
        detail += f", key kid {key.kid} suite {key.suite}"
    await ctx.audit("module-added", module_id, detail)
    document: dict[str, Any] = {"module": out.module_json(module), "apps": apps}
    document["keys"] = [out.module_key_json(key)] if key is not None else []
    lines = [f"added module {module_id} ({detail})"]
    if apps:
        lines.append(f"applications: {' '.join(apps)}")
    if generated and psk is not None:
        document["psk"] = psk.hex()
        lines.append(f"psk {psk.hex()}")
        lines.append("(the PSK is shown only now: provision the module with it)")
    ctx.emit(document, lines)


async def cmd_module_list(ctx: Context) -> None:
    """``module list``: every module, streamed page by page."""
    store = await ctx.store()
    write = ctx.stdout.write
    headers = ("ID", "STATUS", "GROUP", "PSK", "CREATED")
    offset = 0
    if ctx.json:
        write('{\n  "modules": [')
    count = 0
    upcoming = store.list_modules(offset, PAGE_SIZE)
    while True:
        page = await upcoming
        if not page:
            break
        offset += len(page)
        if len(page) == PAGE_SIZE:  # fetch the next page while this one is printed
            upcoming = store.list_modules(offset, PAGE_SIZE)
        if ctx.json:
            for module in page:
                separator = "\n    " if count == 0 else ",\n    "
                write(separator + out.dumps_compact(out.module_json(module)))
                count += 1
        else:
            rows = [
                (
                    m.module_id,
                    m.status.value,
                    m.group,
                    "yes" if m.psk is not None else "no",
                    out.format_time(m.created_at),
                )
                for m in page
            ]
            table = out.format_table(headers, rows)
            for line in table if count == 0 else table[1:]:
                write(line + "\n")
            count += len(page)
        if len(page) < PAGE_SIZE:
            break
    if ctx.json:
        write(("\n  ]" if count else "]") + f',\n  "count": {count}\n}}\n')
    elif count == 0:
        write("no modules\n")


async def cmd_module_show(ctx: Context) -> None:
    """``module show``: one module, its key series, session and queue."""
    module_id = check_module_id(ctx.args.module_id)
    store = await ctx.store()
    module = await store.get_module(module_id)
    if module is None:
        raise OperatorError(f"no module {module_id!r}")
    keys = await store.list_keys(module_id)
    apps = await store.get_module_apps(module_id)
    pending = await store.list_instructions(module_id, list(PENDING_INSTRUCTION_STATES), PAGE_SIZE)
    reports = await store.list_reports(module_id, 1)
    session = await store.get_module_session(module_id)
    now = ctx.now()
    document = {
        "module": out.module_json(module),
        "apps": apps,
        "keys": [out.module_key_json(k) for k in keys],
        "session": out.session_json(session, now) if session is not None else None,
        "pending_instructions": len(pending),
        "pending_instructions_capped": len(pending) >= PAGE_SIZE,
        "last_report_at": reports[0].received_at if reports else None,
    }
    pending_text = f"{len(pending)}{'+' if len(pending) >= PAGE_SIZE else ''}"
    lines = [
        f"module        {module.module_id}",
        f"status        {module.status.value}",
        f"group         {module.group}",
        f"psk           {'yes' if module.psk is not None else 'no'}"
        + (" (reusable)" if module.psk_reusable else ""),
        f"created       {out.format_time(module.created_at)}",
        f"last hello    {out.format_time(module.last_hello_ts)}",
        f"last report   {out.format_time(reports[0].received_at) if reports else '-'}",
        f"applications  {' '.join(apps) or '-'}",
        f"instructions  {pending_text} queued or sent",
    ]
    if session is not None:
        state = "expired" if session.expires_at <= now else "until"
        lines.append(
            f"session       sid {session.sid.hex()} kid {session.kid} suite {session.suite}"
            f" skid {session.skid} {state} {out.format_time(session.expires_at)}"
        )
    if keys:
        lines.append("keys")
        rows = [
            (
                k.kid,
                k.suite,
                k.status.value,
                out.format_time(k.activated_at),
                out.format_time(k.not_after),
                k.public.hex(),
            )
            for k in keys
        ]
        headers = ("KID", "SUITE", "STATUS", "ACTIVATED", "NOT AFTER", "PUBLIC KEY")
        lines += ["  " + line for line in out.format_table(headers, rows)]
    else:
        lines.append("keys          none")
    ctx.emit(document, lines)


async def _set_status(ctx: Context, status: ModuleStatus, reason: str) -> None:
    module_id = check_module_id(ctx.args.module_id)
    store = await ctx.store()
    before = await store.get_module(module_id)
    if before is None:
        raise OperatorError(f"no module {module_id!r}")
    try:
        await store.set_module_status(module_id, status, ctx.now())
    except UnknownModule:
        raise OperatorError(f"no module {module_id!r}") from None
    await ctx.audit(reason, module_id, f"{before.status.value} -> {status.value}")
    ctx.emit(
        {"id": module_id, "status": status.value, "previous_status": before.status.value},
        [f"module {module_id}: {before.status.value} -> {status.value}"],
    )


async def cmd_module_disable(ctx: Context) -> None:
    """``module disable``: refuse the module from now on (its session ends)."""
    if await _waiting_for_approval(ctx):
        await _decide_approval(ctx, approve=False, reason="module-disabled")
        return
    await _set_status(ctx, ModuleStatus.DISABLED, "module-disabled")


async def cmd_module_enable(ctx: Context) -> None:
    """``module enable``: enable a disabled module, or approve a pending one."""
    if await _waiting_for_approval(ctx):
        await _decide_approval(ctx, approve=True, reason="module-enabled")
        return
    await _set_status(ctx, ModuleStatus.ENABLED, "module-enabled")


async def _waiting_for_approval(ctx: Context) -> bool:
    store = await ctx.store()
    module = await store.get_module(check_module_id(ctx.args.module_id))
    return module is not None and module.status is ModuleStatus.PENDING_APPROVAL


async def _decide_approval(ctx: Context, *, approve: bool, reason: str | None = None) -> None:
    """
    Approve or refuse a module waiting for approval (the store's one transaction).

    :param reason: the audit entry's reason (default ``module-approved`` or ``module-refused``).
    """
    module_id = check_module_id(ctx.args.module_id)
    store = await ctx.store()
    try:
        module = await store.decide_approval(module_id, approve, ctx.now())
    except UnknownModule:
        raise OperatorError(f"no module {module_id!r}") from None
    except InvalidTransition:
        current = await store.get_module(module_id)
        state = current.status.value if current is not None else "gone"
        raise OperatorError(f"module {module_id!r} is {state}, not waiting for approval") from None
    if reason is None:
        reason = "module-approved" if approve else "module-refused"
    previous = ModuleStatus.PENDING_APPROVAL.value
    await ctx.audit(reason, module_id, f"{previous} -> {module.status.value}")
    ctx.emit(
        {"id": module_id, "status": module.status.value, "previous_status": previous},
        [f"module {module_id}: {previous} -> {module.status.value}"],
    )


async def cmd_module_apps(ctx: Context) -> None:
    """``module apps``: set (or show) the applications a module's events go to."""
    module_id = check_module_id(ctx.args.module_id)
    apps = check_app_names(ctx.args.apps)
    store = await ctx.store()
    if ctx.args.none and apps:
        raise OperatorError("give applications or --none, not both")
    if not apps and not ctx.args.none:
        if await store.get_module(module_id) is None:
            raise OperatorError(f"no module {module_id!r}")
        current = await store.get_module_apps(module_id)
        ctx.emit({"id": module_id, "apps": current}, [" ".join(current) or "(none)"])
        return
    try:
        await store.set_module_apps(module_id, apps)
    except UnknownModule:
        raise OperatorError(f"no module {module_id!r}") from None
    await ctx.audit("module-apps", module_id, " ".join(apps) or "(none)")
    ctx.emit(
        {"id": module_id, "apps": apps},
        [f"module {module_id}: applications {' '.join(apps) or '(none)'}"],
    )


async def cmd_group_apps(ctx: Context) -> None:
    """``group apps``: set the applications of every module of a group."""
    group = check_group(ctx.args.group_name)
    apps = check_app_names(ctx.args.apps)
    store = await ctx.store()
    count = await store.set_group_apps(group, apps)
    if count == 0:
        raise OperatorError(f"group {group!r} has no module")
    await ctx.audit("group-apps", None, f"group {group}: {' '.join(apps)} ({count} modules)")
    ctx.emit(
        {"group": group, "apps": apps, "modules": count},
        [f"group {group}: {count} modules now belong to {' '.join(apps)}"],
    )


async def cmd_module_approve(ctx: Context) -> None:
    """``module approve``: a module waiting for approval becomes enabled; held data flows."""
    await _decide_approval(ctx, approve=True)


async def cmd_module_refuse(ctx: Context) -> None:
    """``module refuse``: a module waiting for approval is disabled."""
    await _decide_approval(ctx, approve=False)


def _vouched_by(kid: int) -> str:
    if kid == VOUCHED_BY_PSK:
        return "psk"
    if kid == VOUCHED_BY_OPERATOR:
        return "operator"
    return f"kid {kid}"


async def cmd_module_keys(ctx: Context) -> None:
    """``module keys``: every key the module ever had, with its dates and voucher."""
    module_id = check_module_id(ctx.args.module_id)
    store = await ctx.store()
    if await store.get_module(module_id) is None:
        raise OperatorError(f"no module {module_id!r}")
    keys = await store.list_keys(module_id)
    rows = [
        (
            k.kid,
            k.suite,
            k.status.value,
            k.pid,
            _vouched_by(k.vouched_by),
            out.format_time(k.created_at),
            out.format_time(k.activated_at),
            out.format_time(k.retired_at),
            out.format_time(k.not_after),
        )
        for k in keys
    ]
    headers = (
        "KID",
        "SUITE",
        "STATUS",
        "PID",
        "VOUCHED BY",
        "CREATED",
        "ACTIVATED",
        "ENDED",
        "NOT AFTER",
    )
    ctx.emit(
        {"id": module_id, "keys": [out.module_key_json(k) for k in keys]},
        out.format_table(headers, rows) if rows else [f"module {module_id} has no keys"],
    )


async def cmd_module_revoke_key(ctx: Context) -> None:
    """``module revoke-key``: revoke a key; the sessions it opened end at once."""
    module_id = check_module_id(ctx.args.module_id)
    kid = parse_kid(ctx.args.kid)
    store = await ctx.store()
    before = await store.get_key(module_id, kid)
    if before is None:
        raise OperatorError(f"module {module_id!r} has no key {kid}")
    if before.status is not KeyStatus.REVOKED:
        try:
            await store.set_key_status(module_id, kid, KeyStatus.REVOKED, ctx.now())
        except UnknownKey:
            raise OperatorError(f"module {module_id!r} has no key {kid}") from None
        await ctx.audit("key-revoked", module_id, f"kid {kid} ({before.status.value})")
    ctx.emit(
        {"id": module_id, "kid": kid, "status": "revoked", "previous_status": before.status.value},
        [f"module {module_id} key {kid}: {before.status.value} -> revoked (its sessions ended)"],
    )


def _parameter_set(ctx: Context, text: str) -> ParameterSet:
    try:
        return find_set(ctx.config.params, text)
    except KeyError as e:
        raise OperatorError(str(e.args[0])) from None


async def cmd_module_rotate(ctx: Context) -> None:
    """``module rotate``: queue a ``keygen`` for the module (one at a time)."""
    module_id = check_module_id(ctx.args.module_id)
    store = await ctx.store()
    module = await store.get_module(module_id)
    if module is None:
        raise OperatorError(f"no module {module_id!r}")
    if ctx.args.params is not None:
        params = _parameter_set(ctx, ctx.args.params)
    else:
        keys = await store.list_keys(module_id)
        active = [k for k in keys if k.status is KeyStatus.ACTIVE]
        policy = ctx.config.rotation
        if active:
            found = params_for_key(
                active[-1],
                policy.for_group(module.group),
                ctx.config.params,
                policy.retire_suites,
            )
        else:
            found = None
        if found is None:
            raise OperatorError(
                f"module {module_id!r} has no active key to rotate from: name a set with --params"
            )
        params = found
    instruction = await request_rotation(
        store, module_id, params, ctx.now(), secrets.token_bytes, "operator"
    )
    if instruction is None:
        raise OperatorError(
            f"a rotation is already under way for {module_id!r} (a keygen queued or sent,"
            " or a new key not yet active): see 'instruction list' and 'module keys'"
        )
    kid = cbor.decode(instruction.body)[7]
    await ctx.audit(
        "key-rotation-requested", module_id, f"iid {instruction.iid} kid {kid} {params.name}"
    )
    ctx.emit(
        {**out.instruction_json(instruction), "params": params.name, "pid": params.pid, "kid": kid},
        [
            f"queued keygen {instruction.iid} for {module_id}: new key {kid},"
            f" parameter set {params.name} (pid {params.pid}, suite {params.suite})"
        ],
    )


async def cmd_suite_retire(ctx: Context) -> None:
    """``suite retire``: a keygen for every enabled module whose active key is of SUITE."""
    args = ctx.args
    ctx.suite(args.suite_name)  # an unknown name lists the known ones
    ctx.suite(args.to)
    if args.to == args.suite_name:
        raise OperatorError("--to must name another suite")
    if args.to not in ctx.config.suites:
        raise OperatorError(f"suite {args.to!r} is not one of [gateway] suites")
    if args.params is not None:
        params = _parameter_set(ctx, args.params)
        if params.suite != args.to:
            raise OperatorError(f"parameter set {params.name!r} is of suite {params.suite}")
    else:
        found = default_set(ctx.config.params, args.to)
        if found is None:
            raise OperatorError(f"no parameter set of suite {args.to!r}")
        params = found
    store = await ctx.store()
    outcome = await retire_suite(
        store, args.suite_name, params, ctx.now(), secrets.token_bytes, "operator"
    )
    queued = outcome.total
    busy = sum(outcome.skipped.values())
    await ctx.audit(
        "suite-retired",
        None,
        f"{args.suite_name} -> {params.name}: {queued} keygens queued, {busy} under way",
    )
    ctx.emit(
        {
            "suite": args.suite_name,
            "to": args.to,
            "params": params.name,
            "queued": queued,
            "under_way": busy,
        },
        [
            f"suite {args.suite_name}: {queued} modules asked for a {args.to} key"
            f" (parameter set {params.name}); {busy} already rotating",
        ],
    )


async def cmd_module_import(ctx: Context) -> None:
    """``module import``: check every row, then add all modules in one transaction."""
    started = time.monotonic()
    path = ctx.args.file
    data = _read_user_file(path, 512 * 1024 * 1024, "CSV file")
    rows = max(data.count(b"\n") - 1, 1)  # about one row per line after the header
    progress = out.Progress(ctx.stderr, rows, "checking")
    try:
        checked = parse_module_csv(data, ctx.suite, ctx.now(), progress=progress.update)
    except ImportFailed as e:
        progress.finish()
        raise OperatorError(f"{path}: {e}; nothing was imported") from None
    progress.update(progress.total)
    progress.finish()
    modules, keys = checked.modules, checked.keys
    if not modules:
        raise OperatorError(f"{path}: no rows; nothing was imported")
    store = await ctx.store()
    if progress.enabled:
        ctx.stderr.write(f"writing {len(modules)} modules in one transaction...\n")
    try:
        await store.add_modules(modules, keys, checked.apps)
    except DuplicateModule as e:
        line = checked.lines.get(str(e))
        where = f"line {line}: " if line is not None else ""
        raise OperatorError(
            f"{path}: {where}module {str(e)!r} already exists; nothing was imported"
        ) from None
    apps_items = checked.apps
    elapsed = time.monotonic() - started
    await ctx.audit(
        "modules-imported", None, f"{len(modules)} modules, {len(keys)} keys from {path}"
    )
    ctx.emit(
        {
            "file": path,
            "modules": len(modules),
            "keys": len(keys),
            "modules_with_apps": len(apps_items),
            "seconds": round(elapsed, 3),
        },
        [f"imported {len(modules)} modules ({len(keys)} keys) from {path} in {elapsed:.1f} s"],
    )


async def cmd_app_cert_issue(ctx: Context) -> None:
    """``app-cert issue``: a client key and certificate for an application server."""
    args = ctx.args
    apps = ctx.config.apps
    cert_path, key_path = ctx.datadir.issue_app_cert(
        args.name, args.out, args.days, key_type=apps.key_type, rsa_bits=apps.rsa_bits
    )
    _, _, ca_path = ctx.datadir.tls_paths
    ca_copy = os.path.join(args.out, "m2mgw-ca.pem")
    if not os.path.exists(ca_copy):
        shutil.copyfile(ca_path, ca_copy)
    await ctx.audit("app-cert-issued", None, f"{args.name} for {args.days} days")
    ctx.emit(
        {"name": args.name, "certificate": cert_path, "key": key_path, "ca_certificate": ca_copy},
        [
            f"application {args.name}: certificate {cert_path}",
            f"  key {key_path} (mode 0600; keep it secret)",
            f"  trust {ca_copy} to verify the gateway",
        ],
    )


async def cmd_instruction_submit(ctx: Context) -> None:
    """``instruction submit``: queue an instruction for a module."""
    args = ctx.args
    module_id = check_module_id(args.module_id)
    body = body_from_json(args.body)
    new = new_operator_instruction(
        module_id,
        args.kind,
        body,
        now=ctx.now(),
        ttl=args.ttl,
        not_after=args.not_after,
        max_size=ctx.config.modules.max_datagram - REPLY_OVERHEAD,
        source="operator",
        idempotency_key=args.idempotency_key,
    )
    store = await ctx.store()
    try:
        instruction = await store.enqueue(new, ctx.now())
    except UnknownModule:
        raise OperatorError(f"no module {module_id!r}") from None
    await ctx.audit("instruction-submitted", module_id, f"iid {instruction.iid} kind {args.kind}")
    ctx.emit(
        out.instruction_json(instruction),
        [
            f"queued instruction {instruction.iid} ({instruction.kind}, {instruction.wire_size}"
            f" bytes) for {module_id}: {instruction.state.value}"
        ],
    )


def _instruction_rows(instructions: Sequence[Any]) -> list[str]:
    rows = [
        (
            i.module_id,
            i.iid,
            i.kind,
            i.state.value,
            i.attempts,
            out.format_time(i.created_at),
            out.format_time(i.not_after),
            i.source,
        )
        for i in instructions
    ]
    headers = ("ID", "IID", "KIND", "STATE", "TRIES", "CREATED", "NOT AFTER", "SOURCE")
    return out.format_table(headers, rows)


async def cmd_instruction_list(ctx: Context) -> None:
    """``instruction list``: instructions, oldest first."""
    args = ctx.args
    module_id = check_module_id(args.module_id) if args.module_id is not None else None
    states = [InstructionState(s) for s in args.state or ()]
    store = await ctx.store()
    instructions = await store.list_instructions(module_id, states, args.limit)
    ctx.emit(
        {"instructions": [out.instruction_json(i) for i in instructions]},
        _instruction_rows(instructions) if instructions else ["no instructions"],
    )


async def cmd_instruction_cancel(ctx: Context) -> None:
    """``instruction cancel``: cancel a queued or sent instruction."""
    module_id = check_module_id(ctx.args.module_id)
    iid = ctx.args.iid
    store = await ctx.store()
    try:
        instruction = await store.cancel_instruction(module_id, iid, ctx.now())
    except (UnknownModule, UnknownInstruction):
        raise OperatorError(f"module {module_id!r} has no instruction {iid}") from None
    except InvalidTransition:
        current = await store.get_instruction(module_id, iid)
        state = current.state.value if current is not None else "final"
        raise OperatorError(f"instruction {iid} of {module_id!r} is already {state}") from None
    await ctx.audit("instruction-cancelled", module_id, f"iid {instruction.iid}")
    ctx.emit(
        out.instruction_json(instruction),
        [f"instruction {instruction.iid} of {module_id}: {instruction.state.value}"],
    )


_AGE = re.compile(r"([0-9]+)([smhd])\Z")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: int) -> int:
    """
    A point in time: epoch seconds, an ISO 8601 time (UTC unless it says
    otherwise), or an age before ``now`` such as ``90m``, ``12h``, ``7d``.

    :raise m2mgw.admin.OperatorError: none of those.
    """
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    age = _AGE.match(text)
    if age is not None:
        return max(now - int(age.group(1)) * _AGE_SECONDS[age.group(2)], 0)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise OperatorError(
            f"--since {text!r}: not epoch seconds, an ISO 8601 time or an age like 12h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return max(int(moment.timestamp()), 0)


async def cmd_security_events(ctx: Context) -> None:
    """``security-events``: security events and audit entries, oldest first."""
    since = parse_since(ctx.args.since, ctx.now())
    store = await ctx.store()
    events = await store.list_security_events(since, ctx.args.limit)
    rows = [
        (
            out.format_time(e.at),
            e.category,
            e.reason,
            e.source or "-",
            e.claimed_id if e.claimed_id is not None else "-",
            e.detail,
        )
        for e in events
    ]
    headers = ("AT", "CATEGORY", "REASON", "SOURCE", "ID", "DETAIL")
    ctx.emit(
        {"since": since, "events": [out.security_event_json(e) for e in events]},
        out.format_table(headers, rows) if rows else ["no security events"],
    )


# -- db ------------------------------------------------------------------------------------


async def _schema_state(ctx: Context) -> tuple[str, list[str], int, Any]:
    """
    ``(store name, shipped migrations as NNNN_name, level in the database,
    the unopened store)`` of the configured store, read without migrating.
    """
    backend = ctx.config.store.backend
    factory = lookup(IModuleStoreFactory, backend)
    store = factory.create(ctx.config.store.options, ctx.config.data_dir, ctx.reactor)
    if isinstance(store, PostgresStore):
        shipped = [f"{m.version:04d}_{m.name}" for m in postgres_store.shipped_migrations()]
        return backend, shipped, await store.database_level(), store
    if isinstance(store, SQLiteStore):
        shipped = [f"{m.version:04d}_{m.name}" for m in sqlite_store.shipped_migrations()]
        level = 0
        if os.path.exists(store.path):
            uri = pathlib.Path(store.path).resolve().as_uri() + "?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
                level = sqlite_store.schema_level(connection)
        return backend, shipped, level, store
    raise OperatorError(f"the {backend!r} store has no schema migrations")


async def cmd_db_status(ctx: Context) -> None:
    """``db status``: the store, the schema level shipped and in the database, what is pending."""
    backend, shipped, level, _ = await _schema_state(ctx)
    pending = shipped[level:]
    document = {
        "store": backend,
        "shipped_level": len(shipped),
        "database_level": level,
        "pending": pending,
    }
    lines = [
        f"store {backend}",
        f"schema level shipped {len(shipped)}, in the database {level}",
    ]
    if level > len(shipped):
        lines.append("the database is newer than this m2mgw: upgrade m2mgw")
    elif pending:
        lines.append(f"pending migrations: {', '.join(pending)} (m2mgw-admin db migrate)")
    else:
        lines.append("up to date")
    ctx.emit(document, lines)


async def cmd_db_migrate(ctx: Context) -> None:
    """``db migrate``: apply the pending schema migrations (safe while gateways run)."""
    backend, shipped, before, store = await _schema_state(ctx)
    if isinstance(store, PostgresStore):
        after = await store.migrate()
    else:
        await store.open()
        try:
            after = await store.schema_version()
        finally:
            await store.close()
    applied = shipped[before:after]
    if applied:
        await ctx.audit("db-migrate", detail=f"{backend} schema {before} -> {after}")
    ctx.emit(
        {"store": backend, "from_level": before, "to_level": after, "applied": applied},
        [
            f"store {backend}: schema level {before} -> {after}, applied {', '.join(applied)}"
            if applied
            else f"store {backend}: schema level {after}, nothing to apply"
        ],
    )
