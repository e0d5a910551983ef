"""
``m2mgw-module``: a module on the command line, and a fleet simulator.

Every command works on one state file (``--state``, default
``$M2MGW_MODULE_STATE`` or ``./module-state.json``)::

    m2mgw-module provision --id dev-1 --psk HEX --server-key keys.json --gateway gw:5740
    m2mgw-module enroll                      # PSK HELLO, first key registered and activated
    m2mgw-module report --value temp=21.5@Cel
    m2mgw-module wake                        # fetch, execute and confirm instructions
    m2mgw-module listen --interval 60        # wake every minute
    m2mgw-module rotate                      # a new key, vouched for by the current one
    m2mgw-module simulate --modules 100 --interval 5 --duration 60 --provision-with-admin

``--server-key`` takes the output of ``m2mgw-admin server-key show --json``
(a file, or ``-`` for standard input).  Mistakes end with one line on
standard error and exit status 1; ``--json`` prints one JSON document.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
import math
import os
import random as random_module
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater, react

from m2mgw.cliargs import ParserExit, RaisingParser, positive_float, positive_int
from m2mgw.client.module import (
    Executor,
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    ModuleState,
    ServerPublicKey,
)
from m2mgw.client.state import StateFile
from m2mgw.client.transport import (
    Address,
    BlockingTransport,
    ExchangeOutcome,
    RetryPolicy,
    TwistedTransport,
    WakeResult,
    enroll_plan,
    parse_address,
    rotate_plan,
    run_blocking,
    run_twisted,
    wake_plan,
)
from m2mgw.crypto.primitives import MAX_KEY_FILE_BYTES
from m2mgw.errors import CryptoError, M2MGWError, UnknownPlugin
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import MISSING, ConfStatus, Payload
from m2mgw.protocol.senml import to_json
from m2mgw.registry import all_plugins, lookup

__all__ = [
    "PROG",
    "CommandError",
    "build_parser",
    "main",
    "parse_senml",
    "parse_values",
    "simulate",
]

PROG = "m2mgw-module"
DEFAULT_STATE = "module-state.json"
DEFAULT_GATEWAY = "127.0.0.1:5740"
#: The largest ``--server-key`` / ``--senml`` / CSV input read.
MAX_INPUT_BYTES = 16 * 1024 * 1024
#: How long an instruction ``--handler`` may run.
HANDLER_TIMEOUT = 30.0

#: RFC 8428 §6: SenML JSON name -> CBOR label, and the JSON type of each value.
SENML_LABELS: dict[str, tuple[int, tuple[type, ...]]] = {
    "bver": (-1, (int,)),
    "bn": (-2, (str,)),
    "bt": (-3, (int, float)),
    "bu": (-4, (str,)),
    "bv": (-5, (int, float)),
    "bs": (-6, (int, float)),
    "n": (0, (str,)),
    "u": (1, (str,)),
    "v": (2, (int, float)),
    "vs": (3, (str,)),
    "vb": (4, (bool,)),
    "s": (5, (int, float)),
    "t": (6, (int, float)),
    "ut": (7, (int, float)),
    "vd": (8, (str,)),
}


class CommandError(Exception):
    """A mistake or a failure reported as one line, exit status 1."""


class _Parser(RaisingParser):
    """The tool's parser: a malformed command line is a :class:`CommandError`."""

    usage_error = CommandError


# -- argument parsing ----------------------------------------------------------------------------


def _fec(text: str) -> int:
    value = positive_int(text)
    if value > 3:
        raise argparse.ArgumentTypeError("at most 3 copies")
    return value


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``m2mgw-module`` argument parser (global options before or after the command)."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--state",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"the module state file (default: $M2MGW_MODULE_STATE or ./{DEFAULT_STATE})",
    )
    group.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        type=_address,
        action="append",
        default=argparse.SUPPRESS,
        help="a gateway address (repeat for several nodes; default: the state's)",
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="the first retransmission timeout (default 2; doubled per retry)",
    )
    group.add_argument(
        "--fec",
        type=_fec,
        default=argparse.SUPPRESS,
        metavar="N",
        help="send every datagram N times back to back (1-3, default 1)",
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )

    parser = _Parser(
        prog=PROG, parents=[common], description="An MGP/1 module: provision, report, simulate."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=text, description=text
        )
        return sub

    sub = command("provision", "create a module state file")
    sub.add_argument("--id", required=True, dest="module_id", help="the module identity")
    credential = sub.add_mutually_exclusive_group(required=True)
    credential.add_argument("--psk", metavar="HEX", help="the pre-shared key (16-64 bytes)")
    credential.add_argument(
        "--key-file", metavar="FILE", help="the module's private key (PKCS#8 PEM or DER)"
    )
    credential.add_argument(
        "--public-key",
        metavar="OUT",
        help="generate a key pair and write its public key (hex) to OUT, for m2mgw-admin",
    )
    sub.add_argument("--kid", type=positive_int, default=1, help="the key's kid (default 1)")
    sub.add_argument(
        "--server-key",
        required=True,
        metavar="FILE",
        help="output of 'm2mgw-admin server-key show --json' ('-': standard input)",
    )
    sub.add_argument("--suite", help="the cipher suite (default: p256, or the key file's)")
    sub.add_argument("--skid", type=int, help="the server key to use (default: the newest)")
    sub.add_argument(
        "--hello-auth", choices=("sig", "sdh"), default="sig", help="HELLO authentication"
    )
    sub.add_argument(
        "--hint",
        choices=("alias", "identity", "hidden"),
        default="alias",
        help="what the HELLO shows in clear (default: the last alias)",
    )
    sub.add_argument(
        "--no-server-signature",
        action="store_true",
        help="accept HELLO_REPLYs without a server signature",
    )
    sub.add_argument("--force", action="store_true", help="replace an existing state file")
    sub.set_defaults(run=cmd_provision)

    sub = command("enroll", "register the first key with the PSK and activate it")
    sub.add_argument("--in-hello", action="store_true", help="carry the key in the PSK HELLO")
    sub.set_defaults(run=cmd_enroll)

    def wake_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--confirm-now",
            action="store_true",
            help="send confirmations in this wake-up, not the next one",
        )
        sub.add_argument(
            "--handler",
            dest="instruction_handler",
            metavar="COMMAND",
            help="run COMMAND per instruction (kind as argument, body JSON on stdin; exit 0 "
            "done, 2 refused, else failed; stdout JSON is the result); default: print and "
            "confirm",
        )

    sub = command("report", "send readings (SenML)")
    readings = sub.add_mutually_exclusive_group(required=True)
    readings.add_argument("--senml", metavar="JSON", help="a SenML JSON pack ('-': stdin)")
    readings.add_argument(
        "--value",
        action="append",
        metavar="NAME=VALUE[@UNIT]",
        help="one reading (repeatable)",
    )
    sub.add_argument("--in-hello", action="store_true", help="carry it in the HELLO if cold")
    sub.add_argument("--req-time", action="store_true", help="ask for the gateway's time")
    wake_options(sub)
    sub.set_defaults(run=cmd_report)

    sub = command("wake", "one wake-up: fetch, execute and confirm instructions")
    wake_options(sub)
    sub.set_defaults(run=cmd_wake)

    sub = command("listen", "wake up every --interval seconds")
    sub.add_argument("--interval", type=positive_float, required=True, metavar="SECONDS")
    sub.add_argument("--count", type=positive_int, metavar="N", help="stop after N wake-ups")
    wake_options(sub)
    sub.set_defaults(run=cmd_listen)

    sub = command("rotate", "register a new key vouched for by the current one")
    sub.add_argument("--no-activate", action="store_true", help="do not open a session with it yet")
    sub.set_defaults(run=cmd_rotate)

    sub = command("show", "the state, without secrets")
    sub.set_defaults(run=cmd_show)

    sub = command("simulate", "run many simulated modules against a gateway")
    sub.add_argument("--modules", type=positive_int, required=True, metavar="N")
    sub.add_argument("--interval", type=positive_float, required=True, metavar="SECONDS")
    sub.add_argument("--duration", type=positive_float, required=True, metavar="SECONDS")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--csv", metavar="FILE", help="modules already provisioned: id,psk[,suite] columns"
    )
    source.add_argument(
        "--provision-with-admin",
        action="store_true",
        help="provision the modules with 'm2mgw-admin module import'",
    )
    sub.add_argument(
        "--server-key", metavar="FILE", help="with --csv: 'm2mgw-admin server-key show --json'"
    )
    sub.add_argument("--admin-config", metavar="FILE", help="m2mgw-admin's --config")
    sub.add_argument("--admin-data-dir", metavar="DIR", help="m2mgw-admin's --data-dir")
    sub.add_argument(
        "--state-dir", metavar="DIR", default="sim-state", help="one state file per module"
    )
    sub.add_argument("--suite", default="p256", help="the modules' suite (default p256)")
    sub.add_argument("--id-prefix", default="sim-", help="identity prefix (default sim-)")
    sub.add_argument("--enroll", action="store_true", help="enrol each module on its first wake")
    sub.add_argument(
        "--instructions-every",
        type=positive_int,
        metavar="N",
        help="ask for the gateway's time every N wake-ups (exercises req)",
    )
    sub.add_argument(
        "--confirm-now",
        action="store_true",
        help="confirm instructions (and register keys) in the same wake-up, not the next one",
    )
    sub.set_defaults(run=None)
    return parser


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    return getattr(args, name, default)


# -- helpers --------------------------------------------------------------------------------------


def _read_input(path: str, what: str, stdin: IO[str] | None = None) -> bytes:
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        return stream.read(MAX_INPUT_BYTES + 1).encode("utf-8")[: MAX_INPUT_BYTES + 1]
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise CommandError(f"{path}: larger than {MAX_INPUT_BYTES} bytes; not a {what}")
    return data


def _suite(name: str) -> ICipherSuite:
    try:
        suite: ICipherSuite = lookup(ICipherSuite, name)
    except UnknownPlugin as e:
        raise CommandError(str(e)) from None
    return suite


def parse_server_keys(data: bytes, where: str) -> list[ServerPublicKey]:
    """
    Server keys from ``m2mgw-admin server-key show --json`` output (or a
    list of its entries, or one entry); retired ones are left out.

    :raise CommandError: not such JSON, or a key that is not valid for its suite.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"{where}: not JSON ({e})") from None
    if isinstance(document, dict) and "server_keys" in document:
        document = document["server_keys"]
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise CommandError(f"{where}: expected the output of m2mgw-admin server-key show --json")
    keys = []
    for index, entry in enumerate(document):
        what = f"{where}: server key {index + 1}"
        if not isinstance(entry, dict):
            raise CommandError(f"{what}: not an object")
        if entry.get("status") == "retired":
            continue
        skid, suite_name = entry.get("skid"), entry.get("suite")
        if type(skid) is not int or skid < 0 or not isinstance(suite_name, str):
            raise CommandError(f"{what}: needs a skid (whole number) and a suite")
        try:
            public = bytes.fromhex(entry.get("public") or "")
            sig_hex = entry.get("sig_public")
            sig_public = None if sig_hex is None else bytes.fromhex(sig_hex)
        except (TypeError, ValueError):
            raise CommandError(f"{what}: public and sig_public must be hex") from None
        suite = _suite(suite_name)
        try:
            suite.encapsulate(public, secrets.token_bytes)
            if sig_public is not None:
                suite.validate_public_key(sig_public)
        except CryptoError as e:
            raise CommandError(f"{what} (skid {skid}): not a valid {suite_name} key: {e}") from None
        keys.append(ServerPublicKey(skid, suite_name, public, sig_public))
    if not keys:
        raise CommandError(f"{where}: no usable server key")
    return keys


def _choose_skid(keys: Sequence[ServerPublicKey], suite: str, skid: int | None) -> int:
    candidates = [key for key in keys if key.suite == suite]
    if skid is not None:
        if not any(key.skid == skid for key in candidates):
            raise CommandError(f"no {suite} server key with skid {skid}")
        return skid
    if not candidates:
        known = ", ".join(sorted({key.suite for key in keys}))
        raise CommandError(f"no {suite} server key (the gateway has: {known})")
    return max(key.skid for key in candidates)


def parse_senml(text: str) -> list[dict[int, Any]]:
    """
    A SenML JSON pack (RFC 8428) as the CBOR representation: integer labels,
    ``vd`` as bytes.

    :raise CommandError: not a SenML pack of known fields with values of the right type.
    """
    try:
        pack = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"--senml: not JSON ({e})") from None
    if isinstance(pack, dict):
        pack = [pack]
    if not isinstance(pack, list) or not pack:
        raise CommandError("--senml: a SenML pack is a non-empty JSON array of records")
    records = []
    for index, record in enumerate(pack):
        if not isinstance(record, dict) or not record:
            raise CommandError(f"--senml: record {index + 1} is not a non-empty object")
        converted: dict[int, Any] = {}
        for name, value in record.items():
            if name not in SENML_LABELS:
                raise CommandError(f"--senml: record {index + 1}: unknown field {name!r}")
            label, types = SENML_LABELS[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise CommandError(f"--senml: record {index + 1}: {name!r} has the wrong type")
            if name == "vd" and isinstance(value, str):
                try:
                    value = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
                except (binascii.Error, ValueError):
                    raise CommandError(f"--senml: record {index + 1}: vd is not base64") from None
            converted[label] = value
        records.append(converted)
    return records


_VALUE = re.compile(r"^(?P<name>[^=]+)=(?P<value>[^@]*)(?:@(?P<unit>.+))?$")


def parse_values(items: Sequence[str]) -> list[dict[int, Any]]:
    """
    ``NAME=VALUE[@UNIT]`` readings as SenML records: a number becomes ``v``,
    ``true``/``false`` ``vb``, anything else ``vs``.

    :raise CommandError: an item without ``=``.
    """
    records = []
    for item in items:
        match = _VALUE.match(item)
        if match is None:
            raise CommandError(f"--value {item!r}: expected NAME=VALUE or NAME=VALUE@UNIT")
        record: dict[int, Any] = {0: match["name"]}
        text = match["value"]
        if match["unit"]:
            record[1] = match["unit"]
        if text in ("true", "false"):
            record[4] = text == "true"
        else:
            try:
                number = float(text)
            except ValueError:
                record[3] = text
            else:
                if not math.isfinite(number):
                    record[3] = text
                else:
                    record[2] = int(number) if number.is_integer() and "." not in text else number
        records.append(record)
    return records


def _json_value(value: Any) -> Any:
    return None if value is MISSING else to_json(value)


def _print_handler(stdout: IO[str]) -> Executor:
    def execute(kind: str, body: Any) -> tuple[int, Any]:
        text = json.dumps(to_json(body), separators=(",", ":"))
        stdout.write(f"instruction {kind} {text}\n")
        return int(ConfStatus.DONE), None

    return execute


def _command_handler(command: str) -> Executor:
    argv = shlex.split(command)
    if not argv:
        raise CommandError("--handler: empty command")

    def execute(kind: str, body: Any) -> tuple[int, Any]:
        body_json = json.dumps(to_json(body))
        try:
            done = subprocess.run(  # the operator's own command, no shell
                [*argv, kind],
                input=body_json,
                capture_output=True,
                text=True,
                timeout=HANDLER_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return int(ConfStatus.FAILED), f"handler: {type(e).__name__}"
        statuses = {0: ConfStatus.DONE, 2: ConfStatus.REFUSED}
        status = statuses.get(done.returncode, ConfStatus.FAILED)
        result: Any = None
        output = done.stdout.strip()
        if output:
            try:
                result = json.loads(output)
            except json.JSONDecodeError:
                result = output[:200]
        return int(status), result

    return execute


# -- the commands --------------------------------------------------------------------------------


@dataclass
class Context:
    """What a command works with."""

    args: argparse.Namespace
    stdout: IO[str]
    stderr: IO[str]
    stdin: IO[str] | None = None
    clock: Callable[[], float] = time.time

    @property
    def json(self) -> bool:
        """Print JSON."""
        return bool(_option(self.args, "json", False))

    @property
    def state_file(self) -> StateFile:
        """The state file named by ``--state``."""
        path = _option(self.args, "state", None) or os.environ.get(
            "M2MGW_MODULE_STATE", DEFAULT_STATE
        )
        return StateFile(path)

    def emit(self, document: Any, lines: Sequence[str]) -> None:
        """Print ``document`` as JSON with ``--json``, else ``lines``."""
        if self.json:
            self.stdout.write(json.dumps(document, sort_keys=True) + "\n")
        else:
            for line in lines:
                self.stdout.write(line + "\n")
        self.stdout.flush()


@dataclass
class _Module:
    """A loaded module: its state file, endpoint and transport."""

    store: StateFile
    endpoint: ModuleEndpoint
    transport: BlockingTransport

    def save(self, state: ModuleState) -> None:
        self.store.save(state)


def _open_module(ctx: Context, execute: Executor | None = None) -> _Module:
    store = ctx.state_file
    state = store.load()
    gateways = _option(ctx.args, "gateway", None)
    if gateways is None:
        try:
            gateways = [parse_address(text) for text in state.gateways or [DEFAULT_GATEWAY]]
        except ValueError as e:
            raise CommandError(f"{store.path}: bad gateway address: {e}") from None
    try:
        endpoint = ModuleEndpoint(
            state, clock=ctx.clock, execute=execute or _print_handler(ctx.stdout)
        )
    except ValueError as e:
        raise CommandError(f"{store.path}: {e}") from None
    timeout = _option(ctx.args, "timeout", 2.0)
    policy = RetryPolicy(
        timeout=timeout, max_timeout=max(30.0, timeout), fec_copies=_option(ctx.args, "fec", 1)
    )
    try:
        transport = BlockingTransport(gateways, policy=policy)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return _Module(store, endpoint, transport)


def _result_document(module: _Module, result: WakeResult) -> dict[str, Any]:
    state = module.endpoint.state
    session = state.session
    return {
        "ok": result.ok,
        "failure": result.failure,
        "sent": result.sent,
        "answered": result.answered,
        "instructions": [
            {
                "iid": item.iid,
                "kind": item.kind,
                "status": item.status,
                "result": _json_value(item.result),
                "duplicate": item.duplicate,
            }
            for item in result.instructions
        ],
        "keyreg": None
        if result.keyreg is None
        else {
            "kid": result.keyreg.kid,
            "status": result.keyreg.status,
            "reason": result.keyreg.reason,
        },
        "session": None if session is None else {"kid": session.kid, "skid": session.skid},
        "pending_confirmations": len(state.pending_confs),
        "unanswered": state.outbox is not None,
    }


_STATUS_WORDS = {0: "done", 1: "failed", 2: "refused"}


def _result_lines(result: WakeResult) -> list[str]:
    sent, answered = result.sent, result.answered
    lines = [
        f"{sent} datagram{'' if sent == 1 else 's'} sent, "
        f"{answered} repl{'y' if answered == 1 else 'ies'}"
    ]
    for item in result.instructions:
        word = _STATUS_WORDS.get(item.status, str(item.status))
        again = " (executed before)" if item.duplicate else ""
        lines.append(f"instruction {item.iid} {item.kind}: {word}{again}")
    if result.keyreg is not None:
        word = "accepted" if result.keyreg.status == 0 else f"refused ({result.keyreg.status})"
        reason = f": {result.keyreg.reason}" if result.keyreg.reason else ""
        lines.append(f"key {result.keyreg.kid} {word}{reason}")
    return lines


def _finish(ctx: Context, module: _Module, result: WakeResult, done: list[str]) -> None:
    ctx.emit(_result_document(module, result), _result_lines(result) + (done if result.ok else []))
    if not result.ok:
        kept = " (kept; it is re-sent next time)" if module.endpoint.state.outbox else ""
        raise CommandError(f"{result.failure}{kept}")


def cmd_provision(ctx: Context) -> None:
    """``provision``: a new state file."""
    args = ctx.args
    identity = args.module_id
    if not 1 <= len(identity.encode("utf-8")) <= 64:
        raise CommandError("--id: 1-64 bytes of UTF-8")
    keys = parse_server_keys(_read_input(args.server_key, "server key", ctx.stdin), args.server_key)
    psk = None
    own: dict[int, ModuleKeyPair] = {}
    suite_name = args.suite
    if args.psk is not None:
        try:
            psk = bytes.fromhex(args.psk)
        except ValueError:
            raise CommandError("--psk: not hex") from None
        if not 16 <= len(psk) <= 64:
            raise CommandError("--psk: a PSK is 16-64 bytes (32-128 hex digits)")
    elif args.key_file is not None:
        data = _read_input(args.key_file, "private key")[:MAX_KEY_FILE_BYTES]
        # Without --suite, a P-256 key is taken for "p256" (not "p256-ccm8").
        known = sorted(all_plugins(ICipherSuite), key=lambda name: (name != "p256", name))
        names = [suite_name] if suite_name else known
        loaded = None
        for name in names:
            try:
                loaded = (name, _suite(name).load_signing_key(data))
                break
            except CryptoError:
                continue
        if loaded is None:
            wanted = f"a {suite_name}" if suite_name else "an MGP/1"
            raise CommandError(f"{args.key_file}: not {wanted} private key (PKCS#8 PEM or DER)")
        suite_name = loaded[0]
        suite = _suite(suite_name)
        own[args.kid] = ModuleKeyPair(args.kid, suite_name, suite.dump_signing_key(loaded[1]))
    suite_name = suite_name or "p256"
    suite = _suite(suite_name)
    skid = _choose_skid(keys, suite_name, args.skid)
    if args.public_key is not None:
        private = suite.generate_signing_key()
        own[args.kid] = ModuleKeyPair(args.kid, suite_name, suite.dump_signing_key(private))
        public_hex = suite.signing_public(private).hex() + "\n"
        if os.path.exists(args.public_key) and not args.force:
            raise CommandError(f"{args.public_key}: exists (use --force to replace it)")
    gateways = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in _option(args, "gateway", [])]
    state = ModuleState(
        identity=identity,
        suite=suite_name,
        server_keys={key.skid: key for key in keys},
        skid=skid,
        psk=psk,
        keys=own,
        require_server_signature=not args.no_server_signature,
        hello_method=args.hello_auth,
        hint_mode=args.hint,
        gateways=gateways or [DEFAULT_GATEWAY],
    )
    try:
        state.check()
    except ValueError as e:
        raise CommandError(str(e)) from None
    store = ctx.state_file
    if args.force:
        store.save(state)
    else:
        store.create(state)
    lines = [f"provisioned {identity} in {store.path} (suite {suite_name}, server key {skid})"]
    document: dict[str, Any] = {
        "state": store.path,
        "id": identity,
        "suite": suite_name,
        "skid": skid,
        "gateways": state.gateways,
        "credential": "psk" if psk is not None else "key",
    }
    if args.public_key is not None:
        with open(args.public_key, "w", encoding="ascii") as f:
            f.write(public_hex)
        document["public_key"] = args.public_key
        lines.append(
            f"register its key: m2mgw-admin module add {shlex.quote(identity)} "
            f"--public-key {shlex.quote(args.public_key)} --kid {args.kid} --suite {suite_name}"
        )
    ctx.emit(document, lines)


def cmd_enroll(ctx: Context) -> None:
    """``enroll``: the first key, vouched for by the PSK, registered and activated."""
    module = _open_module(ctx)
    with module.transport:
        try:
            plan = enroll_plan(module.endpoint, module.save, in_hello=ctx.args.in_hello)
            result = run_blocking(module.transport, plan)
        finally:
            module.save(module.endpoint.state)
    state = module.endpoint.state
    active = [kid for kid, key in state.keys.items() if key.status == KeyState.ACTIVE]
    done = [f"enrolled: key {max(active)} active; the PSK is forgotten"] if active else []
    _finish(ctx, module, result, done)


def _wake_executor(ctx: Context) -> Executor | None:
    handler = _option(ctx.args, "instruction_handler", None)
    return None if handler is None else _command_handler(handler)


def _wake(ctx: Context, module: _Module, payload: Payload | None = None) -> WakeResult:
    try:
        plan = wake_plan(
            module.endpoint,
            module.save,
            payload=payload,
            in_hello=_option(ctx.args, "in_hello", False),
            confirm_now=_option(ctx.args, "confirm_now", False),
        )
        return run_blocking(module.transport, plan)
    finally:
        module.save(module.endpoint.state)


def cmd_report(ctx: Context) -> None:
    """``report``: SenML readings in a DATA (after a HELLO if needed)."""
    args = ctx.args
    if args.senml is not None:
        text = args.senml
        if text == "-":
            text = (ctx.stdin or sys.stdin).read(MAX_INPUT_BYTES)
        data = parse_senml(text)
    else:
        data = parse_values(args.value)
    payload = Payload(data=data, req=("time",) if args.req_time else ())
    module = _open_module(ctx, _wake_executor(ctx))
    with module.transport:
        result = _wake(ctx, module, payload)
    _finish(ctx, module, result, [f"reported {len(data)} reading(s)"])


def cmd_wake(ctx: Context) -> None:
    """``wake``: one wake-up without readings."""
    module = _open_module(ctx, _wake_executor(ctx))
    with module.transport:
        result = _wake(ctx, module)
    _finish(ctx, module, result, [])


def cmd_listen(ctx: Context) -> None:
    """``listen``: a wake-up every ``--interval`` seconds, until ``--count`` or Ctrl-C."""
    args = ctx.args
    module = _open_module(ctx, _wake_executor(ctx))
    count = 0
    with module.transport:
        try:
            while args.count is None or count < args.count:
                started = time.monotonic()
                result = _wake(ctx, module)
                count += 1
                ctx.emit(_result_document(module, result), _result_lines(result))
                if not result.ok:
                    ctx.stderr.write(f"{PROG}: wake-up {count}: {result.failure}\n")
                if args.count is not None and count >= args.count:
                    break
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            ctx.stderr.write(f"{PROG}: stopped after {count} wake-up(s)\n")


def cmd_rotate(ctx: Context) -> None:
    """``rotate``: a new key, kid highest + 1, vouched for by the current credential."""
    module = _open_module(ctx)
    with module.transport:
        try:
            plan = rotate_plan(module.endpoint, module.save, activate=not ctx.args.no_activate)
            result = run_blocking(module.transport, plan)
        finally:
            module.save(module.endpoint.state)
    keys = module.endpoint.state.keys
    newest = max(keys) if keys else None
    done = [] if newest is None else [f"key {newest} is {keys[newest].status.value}"]
    _finish(ctx, module, result, done)


def cmd_show(ctx: Context) -> None:
    """``show``: what the state holds, without secrets."""
    store = ctx.state_file
    state = store.load()
    session = state.session
    document = {
        "state": store.path,
        "id": state.identity,
        "suite": state.suite,
        "psk": state.psk is not None,
        "keys": [
            {"kid": key.kid, "suite": key.suite, "status": key.status.value, "pid": key.pid}
            for key in sorted(state.keys.values(), key=lambda key: key.kid)
        ],
        "server_keys": [
            {"skid": key.skid, "suite": key.suite} for key in state.server_keys.values()
        ],
        "skid": state.skid,
        "gateways": state.gateways,
        "last_ts": state.last_ts,
        "session": None
        if session is None
        else {
            "sid": session.sid.hex(),
            "kid": session.kid,
            "skid": session.skid,
            "expires_at": session.expires_at,
            "next_ctr": session.next_ctr,
        },
        "executed": len(state.executed),
        "pending_confirmations": len(state.pending_confs),
        "pending_keyreg": None if state.pending_keyreg is None else state.pending_keyreg.kid,
        "unanswered": state.outbox is not None,
    }
    keys = ", ".join(f"{k['kid']} {k['status']}" for k in document["keys"]) or "none"  # type: ignore[attr-defined]
    lines = [
        f"{state.identity} ({state.suite}), keys: {keys}, psk: {'yes' if state.psk else 'no'}",
        "session: none"
        if session is None
        else f"session: kid {session.kid}, skid {session.skid}, next ctr {session.next_ctr}",
        f"gateways: {' '.join(state.gateways)}",
    ]
    ctx.emit(document, lines)


# -- the simulator -----------------------------------------------------------------------------


@dataclass
class SimulationStats:
    """
    What the simulated fleet did.

    :ivar keys_enrolled: modules whose first key became active.
    :ivar keys_rotated: key rotations completed (a newer key became active).
    :ivar reports_sent: readings that left in a DataBody.
    :ivar reports_acknowledged: those whose DataBody the gateway acknowledged
        (stored exactly once, MGP/1 §8.4); the others wait in a module's
        outbox and are re-sent at its next wake-up.
    """

    wakes: int = 0
    sent: int = 0
    answered: int = 0
    executed: int = 0
    exchanges: int = 0
    keys_enrolled: int = 0
    keys_rotated: int = 0
    reports_sent: int = 0
    reports_acknowledged: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def add(self, result: WakeResult) -> None:
        """Count one wake-up."""
        self.wakes += 1
        for outcome in result.exchanges:
            self.add_exchange(outcome)
        self.executed += sum(1 for item in result.instructions if not item.duplicate)
        if result.keyreg is not None and result.keyreg.status != 0:
            self.failures[f"keyreg refused ({result.keyreg.status})"] += 1

    def add_exchange(self, outcome: ExchangeOutcome) -> None:
        """Count one exchange."""
        self.exchanges += 1
        self.sent += outcome.sent
        self.answered += len(outcome.replies)
        if outcome.ok:
            self.latencies.append(outcome.elapsed)
        else:
            self.failures[outcome.failure or "failed"] += 1

    def percentile(self, fraction: float) -> float | None:
        """The latency (seconds) below which ``fraction`` of answered exchanges fall."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return ordered[index]

    def document(self, modules: int, seconds: float) -> dict[str, Any]:
        """The summary as JSON."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 2)

        return {
            "modules": modules,
            "seconds": round(seconds, 3),
            "wakes": self.wakes,
            "exchanges": self.exchanges,
            "sent": self.sent,
            "answered": self.answered,
            "instructions_executed": self.executed,
            "keys": {"enrolled": self.keys_enrolled, "rotated": self.keys_rotated},
            "reports": {"sent": self.reports_sent, "acknowledged": self.reports_acknowledged},
            "failures": dict(sorted(self.failures.items())),
            "latency_ms": {
                "p50": ms(self.percentile(0.50)),
                "p90": ms(self.percentile(0.90)),
                "p99": ms(self.percentile(0.99)),
            },
        }


def _file_name(module_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", module_id) and not module_id.startswith("."):
        return f"{module_id}.json"
    return f"id-{module_id.encode('utf-8').hex()}.json"


@dataclass(frozen=True)
class _Provisioned:
    module_id: str
    psk: bytes
    suite: str


def _csv_modules(path: str, count: int, default_suite: str) -> list[_Provisioned]:
    data = _read_input(path, "CSV file")
    try:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CommandError(f"{path}: not a CSV file ({e})") from None
    modules = []
    for line, row in enumerate(rows, start=2):
        module_id = (row.get("id") or "").strip()
        psk_hex = (row.get("psk") or "").strip()
        if not module_id or not psk_hex:
            continue
        try:
            psk = bytes.fromhex(psk_hex)
        except ValueError:
            raise CommandError(f"{path}: line {line}: psk is not hex") from None
        suite = (row.get("suite") or "").strip() or default_suite
        modules.append(_Provisioned(module_id, psk, suite))
        if len(modules) == count:
            return modules
    raise CommandError(f"{path}: {len(modules)} modules with a PSK; --modules asks for {count}")


async def _admin(argv: list[str], reactor: Any) -> str:
    """Run an ``m2mgw-admin`` command in this process; its standard output."""
    from m2mgw.admin import cli as admin_cli

    out, err = io.StringIO(), io.StringIO()
    status = await admin_cli.run(argv, reactor, stdout=out, stderr=err)
    if status != 0:
        message = " ".join(err.getvalue().split()) or f"exit status {status}"
        raise CommandError(f"m2mgw-admin {' '.join(argv[:2])}: {message}")
    return out.getvalue()


def _admin_options(args: argparse.Namespace) -> list[str]:
    options = []
    if args.admin_config:
        options += ["--config", args.admin_config]
    if args.admin_data_dir:
        options += ["--data-dir", args.admin_data_dir]
    return options


async def _admin_provision(
    args: argparse.Namespace, reactor: Any, existing: set[str]
) -> tuple[list[_Provisioned], list[ServerPublicKey]]:
    options = _admin_options(args)
    keys_json = await _admin(["server-key", "show", "--json", *options], reactor)
    keys = parse_server_keys(keys_json.encode("utf-8"), "m2mgw-admin server-key show")
    modules = [
        _Provisioned(f"{args.id_prefix}{index:05d}", secrets.token_bytes(32), args.suite)
        for index in range(args.modules)
    ]
    new = [module for module in modules if module.module_id not in existing]
    if new:
        path = os.path.join(args.state_dir, f"provision-{secrets.token_hex(4)}.csv")
        with open(path, "w", encoding="utf-8", newline="") as f:
            os.fchmod(f.fileno(), 0o600)
            writer = csv.writer(f)
            writer.writerow(["id", "psk"])  # the suite is the module's choice, not the row's
            for module in new:
                writer.writerow([module.module_id, module.psk.hex()])
        try:
            await _admin(["module", "import", path, *options], reactor)
        finally:
            os.unlink(path)
    return modules, keys


def _raise_file_limit(needed: int) -> None:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        if target < needed:
            raise CommandError(
                f"{needed} open files needed (one socket per module) but the limit is {target}"
            )


class _Fleet:
    """The simulated modules and their counters."""

    def __init__(self, reactor: Any, args: argparse.Namespace, stderr: IO[str]) -> None:
        self.reactor = reactor
        self.args = args
        self.stderr = stderr
        self.stats = SimulationStats()
        self.started = reactor.seconds()
        self.deadline = self.started + args.duration
        timeout = _option(args, "timeout", 2.0)
        self.policy = RetryPolicy(
            timeout=timeout, max_timeout=max(30.0, timeout), fec_copies=_option(args, "fec", 1)
        )
        # Jitter and fake readings, not secrets.
        self.random = random_module.Random()  # noqa: S311
        isatty = getattr(stderr, "isatty", None)
        self.live = bool(isatty and isatty())

    def progress(self) -> None:
        stats = self.stats
        elapsed = self.reactor.seconds() - self.started
        failures = sum(stats.failures.values())
        self.stderr.write(
            f"\r{elapsed:7.1f}/{self.args.duration:g} s  wakes {stats.wakes}  sent {stats.sent}"
            f"  answered {stats.answered}  executed {stats.executed}  failures {failures}  "
        )
        self.stderr.flush()

    async def module(
        self, endpoint: ModuleEndpoint, store: StateFile, transport: TwistedTransport, index: int
    ) -> None:
        args = self.args
        #: The toks of the DataBodies carrying a reading, not yet acknowledged.
        readings: set[bytes] = set()

        def save(state: ModuleState) -> None:
            # Called before every datagram that depends on a change: a new
            # DataBody is seen here before it leaves.
            outbox = state.outbox
            if outbox is not None and outbox.tok not in readings and _carries_data(outbox.body):
                readings.add(outbox.tok)
                self.stats.reports_sent += 1
            store.save(state)

        await deferLater(self.reactor, self.random.uniform(0, args.interval), lambda: None)
        wakes = 0
        while self.reactor.seconds() < self.deadline:
            began = self.reactor.seconds()
            wakes += 1
            active_before = _active_kid(endpoint.state)
            try:
                state = endpoint.state
                if args.enroll and state.psk is not None and not state.keys:
                    result = await run_twisted(transport, enroll_plan(endpoint, save))
                else:
                    value = round(self.random.gauss(21, 2), 2)
                    reading = [{0: "temperature", 1: "Cel", 2: value}]
                    every = args.instructions_every
                    req = ("time",) if every and wakes % every == 0 else ()
                    payload = Payload(data=reading, req=req)
                    plan = wake_plan(endpoint, save, payload=payload, confirm_now=args.confirm_now)
                    result = await run_twisted(transport, plan)
                self.stats.add(result)
                acks = {
                    reply.body.ack
                    for outcome in result.exchanges
                    for reply in outcome.replies
                    if reply.kind == "data" and reply.body is not None
                }
                self.stats.reports_acknowledged += len(acks & readings)
                readings -= acks
            except (M2MGWError, CommandError) as e:
                self.stats.wakes += 1
                self.stats.failures[f"error: {type(e).__name__}"] += 1
            active_after = _active_kid(endpoint.state)
            if active_after > active_before:
                if active_before:
                    self.stats.keys_rotated += 1
                else:
                    self.stats.keys_enrolled += 1
            next_wake = began + args.interval
            delay = next_wake - self.reactor.seconds()
            if delay > 0:
                await deferLater(self.reactor, delay, lambda: None)


def _active_kid(state: ModuleState) -> int:
    """The module's newest active key (0: none)."""
    return max((k.kid for k in state.keys.values() if k.status == KeyState.ACTIVE), default=0)


def _carries_data(body: bytes) -> bool:
    """True if a DataBody's payload carries a reading (``pl`` ``data``)."""
    try:
        decoded = cbor.decode(body)
    except M2MGWError:
        return False
    payload = decoded.get(5) if isinstance(decoded, dict) else None
    return isinstance(payload, dict) and 10 in payload


def _simulated_execute(kind: str, body: Any) -> tuple[int, Any]:
    return int(ConfStatus.DONE), None


def _bind_address(host: str) -> str:
    if ":" in host:
        return "::1" if host == "::1" else "::"
    return "127.0.0.1" if host.startswith("127.") else ""


async def simulate(args: argparse.Namespace, reactor: Any, stdout: IO[str], stderr: IO[str]) -> int:
    """
    Run ``simulate`` on a running reactor.

    :return: the exit status (0: the run completed; failures are in the summary).
    :raise CommandError: bad options, provisioning failed, too many modules.
    """
    gateways = _option(args, "gateway", None) or [parse_address(DEFAULT_GATEWAY)]
    resolved: list[Address] = []
    for host, port in gateways:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise CommandError(f"cannot resolve {host}: {e}") from None
        resolved.append((str(info[4][0]), port))
    _suite(args.suite)
    try:
        os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{args.state_dir}: {e.strerror or e}") from None
    _raise_file_limit(args.modules + 64)

    existing: set[str] = set()
    if args.provision_with_admin:
        ids = [f"{args.id_prefix}{index:05d}" for index in range(args.modules)]
        existing = {
            module_id
            for module_id in ids
            if os.path.exists(os.path.join(args.state_dir, _file_name(module_id)))
        }
        provisioned, keys = await _admin_provision(args, reactor, existing)
    else:
        if not args.server_key:
            raise CommandError("--csv needs --server-key (m2mgw-admin server-key show --json)")
        keys = parse_server_keys(_read_input(args.server_key, "server key"), args.server_key)
        provisioned = _csv_modules(args.csv, args.modules, args.suite)

    fleet = _Fleet(reactor, args, stderr)
    gateway_texts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in resolved]
    modules = []
    for module in provisioned:
        store = StateFile(os.path.join(args.state_dir, _file_name(module.module_id)), durable=False)
        if store.exists():
            state = store.load()
        else:
            state = ModuleState(
                identity=module.module_id,
                suite=module.suite,
                server_keys={key.skid: key for key in keys},
                skid=_choose_skid(keys, module.suite, None),
                psk=module.psk,
                gateways=gateway_texts,
            )
            store.save(state)
        endpoint = ModuleEndpoint(state, execute=_simulated_execute)
        transport = TwistedTransport(reactor, resolved, policy=fleet.policy)
        modules.append((endpoint, store, transport))

    ports = []
    try:
        for _, _, transport in modules:
            ports.append(reactor.listenUDP(0, transport, interface=_bind_address(resolved[0][0])))
    except Exception as e:
        for port in ports:
            port.stopListening()
        raise CommandError(f"cannot open a UDP socket: {e}") from None

    ticker = LoopingCall(fleet.progress)
    ticker.clock = reactor
    if fleet.live:
        ticker.start(0.5)
    try:
        fleet.started = reactor.seconds()
        fleet.deadline = fleet.started + args.duration
        runs = [
            ensureDeferred(fleet.module(endpoint, store, transport, index))
            for index, (endpoint, store, transport) in enumerate(modules)
        ]
        await gatherResults(runs, consumeErrors=True)
    finally:
        if ticker.running:
            ticker.stop()
            fleet.progress()
            stderr.write("\n")
        for port in ports:
            await port.stopListening()
        for endpoint, store, _ in modules:
            store.save(endpoint.state)

    seconds = reactor.seconds() - fleet.started
    document = fleet.stats.document(len(modules), seconds)
    if _option(args, "json", False):
        stdout.write(json.dumps(document, sort_keys=True) + "\n")
    else:
        latency = document["latency_ms"]
        failures = document["failures"]
        failure_text = ", ".join(f"{reason}: {n}" for reason, n in failures.items()) or "none"

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:g} ms"

        stdout.write(
            f"{len(modules)} modules, {seconds:.1f} s: {document['wakes']} wake-ups, "
            f"{document['sent']} datagrams sent, {document['answered']} replies, "
            f"{document['instructions_executed']} instructions executed\n"
            f"keys: {document['keys']['enrolled']} enrolled, {document['keys']['rotated']} rotated;"
            f" reports: {document['reports']['sent']} sent,"
            f" {document['reports']['acknowledged']} acknowledged\n"
            f"failures: {failure_text}\n"
            f"latency: p50 {fmt(latency['p50'])}, p90 {fmt(latency['p90'])}, "
            f"p99 {fmt(latency['p99'])}\n"
        )
    stdout.flush()
    return 0


# -- entry points ---------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """
    The console script.

    :return: the exit status: 0 done, 1 a mistake or a failure (one line on stderr).
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
    if args.run is None:
        return _main_simulate(args, stdout, stderr)
    ctx = Context(args, stdout, stderr, stdin, clock)
    try:
        args.run(ctx)
    except (CommandError, M2MGWError, OSError, ValueError) as e:
        stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return 1
    except Exception:
        stderr.write(f"{PROG}: internal error (please report it):\n{traceback.format_exc()}")
        return 1
    return 0


def _main_simulate(args: argparse.Namespace, stdout: IO[str], stderr: IO[str]) -> int:
    status = [1]

    async def go(reactor: Any) -> None:
        try:
            status[0] = await simulate(args, reactor, stdout, stderr)
        except (CommandError, M2MGWError, OSError, ValueError) as e:
            stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        except Exception:
            stderr.write(f"{PROG}: internal error (please report it):\n{traceback.format_exc()}")

    def start(reactor: Any) -> Deferred[None]:
        return ensureDeferred(go(reactor))

    try:
        react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            return e.code if isinstance(e.code, int) else 1
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
