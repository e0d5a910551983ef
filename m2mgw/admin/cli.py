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
import datetime
import getpass
import os
import re
import secrets
import shutil
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any, NoReturn

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
from m2mgw.config import DEFAULT_CONFIG_PATH, GatewayConfig, load_config
from m2mgw.datadir import DataDir, gateway_tls_names, register_server_keys
from m2mgw.errors import (
    DuplicateModule,
    ImportFailed,
    InvalidTransition,
    M2MGWError,
    UnknownInstruction,
    UnknownModule,
)
from m2mgw.instructions.submission import REPLY_OVERHEAD
from m2mgw.interfaces import ICipherSuite, IModuleStore, IModuleStoreFactory
from m2mgw.records import (
    VOUCHED_BY_OPERATOR,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    SecurityEvent,
)
from m2mgw.registry import lookup

__all__ = ["build_parser", "main", "run"]

PROG = "m2mgw-admin"

#: Modules fetched per store call by ``module list``.
PAGE_SIZE = 1000

#: Generated PSKs are this long (MGP/1 §4 allows 16-64 bytes).
GENERATED_PSK_BYTES = 32


# -- the command line ------------------------------------------------------------------------


class UsageError(Exception):
    """The command line is malformed (exit status 2)."""


class _Exit(Exception):
    """argparse finished early (``--help``, ``--version``) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of exiting, so :func:`run` can return."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _non_negative_int(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


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
    sub.add_argument("--kid", type=_positive_int, help="the public key's id (1 or more)")
    sub.add_argument("--suite", help="the public key's cipher suite")
    sub.add_argument("--group", default="default", help="the module's group (default: default)")
    sub.add_argument(
        "--pending-approval",
        action="store_true",
        help="authenticate it but hold instructions and data until 'module enable'",
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
        "import",
        cmd_module_import,
        "provision modules from a CSV file, all or none",
    )
    sub.add_argument("file", metavar="FILE.csv", help=f"columns: {', '.join(COLUMNS)}")

    app_cert = commands.add_parser("app-cert", help="application server certificates")
    app_cert_commands = app_cert.add_subparsers(metavar="ACTION", required=True)
    sub = command(
        app_cert_commands, "issue", cmd_app_cert_issue, "issue a client certificate for NAME"
    )
    sub.add_argument("name", metavar="NAME", help="the application's principal name")
    sub.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    sub.add_argument(
        "--days", type=_positive_int, default=825, help="validity in days (default 825)"
    )

    instruction = commands.add_parser("instruction", help="the modules' instruction queues")
    instruction_commands = instruction.add_subparsers(metavar="ACTION", required=True)
    sub = command(instruction_commands, "submit", cmd_instruction_submit, "queue an instruction")
    sub.add_argument("module_id", metavar="ID")
    sub.add_argument("kind", metavar="KIND", help="e.g. set, config, sleep, rehello")
    sub.add_argument("body", metavar="BODY_JSON", nargs="?", help="the body as JSON (default null)")
    expiry = sub.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="expire after")
    expiry.add_argument("--not-after", type=_positive_int, metavar="EPOCH", help="expire at")
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
    sub.add_argument("--limit", type=_positive_int, default=1000, help="at most (default 1000)")
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
    sub.add_argument("--limit", type=_positive_int, default=1000, help="at most (default 1000)")
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
    except _Exit as e:
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
    module = Module(module_id=module_id, status=status, psk=psk, group=group, created_at=now)
    store = await ctx.store()
    try:
        await store.add_modules(
            [module], [key] if key is not None else [], {module_id: apps} if apps else None
        )
    except DuplicateModule:
        raise OperatorError(f"module {module_id!r} already exists") from None
    detail = f"status {status.value}, psk {'yes' if psk else 'no'}"
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
    pending = await store.list_instructions(
        module_id, [InstructionState.QUEUED, InstructionState.SENT], PAGE_SIZE
    )
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
        await store.set_module_status(module_id, status)
    except UnknownModule:
        raise OperatorError(f"no module {module_id!r}") from None
    await ctx.audit(reason, module_id, f"{before.status.value} -> {status.value}")
    ctx.emit(
        {"id": module_id, "status": status.value, "previous_status": before.status.value},
        [f"module {module_id}: {before.status.value} -> {status.value}"],
    )


async def cmd_module_disable(ctx: Context) -> None:
    """``module disable``: refuse the module from now on (its session ends)."""
    await _set_status(ctx, ModuleStatus.DISABLED, "module-disabled")


async def cmd_module_enable(ctx: Context) -> None:
    """``module enable``: enable a disabled module, or approve a pending one."""
    await _set_status(ctx, ModuleStatus.ENABLED, "module-enabled")


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
