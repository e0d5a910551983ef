"""
Every extension point of m2mgw, as zope interfaces.

Implementations are found with :func:`twisted.plugin.getPlugins` in the
:mod:`m2mgw.plugins` package (see :mod:`m2mgw.registry`): a third party adds a
cipher suite, a store or an instruction source by installing a module that
drops a plugin object into ``m2mgw/plugins/``.  Each interface states its whole
contract; ``tests/test_contract_*.py`` runs one contract test class against
every implementation found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: A source of random bytes: ``random(n)`` returns ``n`` bytes.  ``os.urandom``
#: in production; tests inject a scripted source to reproduce vectors.
RandomSource = Callable[[int], bytes]


class ICipherSuite(Interface):
    """
    One MGP/1 cipher suite (spec §3): every algorithm a session uses.

    A suite is stateless: keys are opaque objects it creates and parses
    itself.  Public keys cross the boundary as ``bytes`` in their wire
    encoding (SEC1 points, raw 32-byte X25519/Ed25519 keys, DER
    SubjectPublicKeyInfo for RSA).  Every method that takes a public key
    validates it (point on the curve, not hybrid, not the identity; RSA size
    2048-3072 and exponent 65537) and raises :class:`m2mgw.errors.BadKey` or
    :class:`m2mgw.errors.BadPoint` otherwise.  No method logs key material.
    Third-party exceptions never escape: they are translated to
    :mod:`m2mgw.errors`.
    """

    name = Attribute("The suite's wire name, e.g. ``'p256'``; unique among suites.")
    key_len = Attribute("AEAD key size in bytes.")
    nonce_len = Attribute("AEAD nonce size in bytes.")
    tag_len = Attribute("AEAD tag size in bytes.")
    hash_name = Attribute(
        "``'SHA-256'`` or ``'SHA-384'``: the hash of HKDF, HMAC (SDH) and signatures."
    )
    curve = Attribute(
        "The named curve (``'P-256'``, ``'P-384'``, ``'Ed25519'``) or ``None`` (RSA)."
    )
    supports_sdh = Attribute(
        "True if HELLO authentication method 3 (static-static ECDH) is offered."
    )
    signature_len = Attribute("Signature length in bytes (RSA: that of the server key's modulus).")
    supports_custom_curves = Attribute(
        "True if Params may carry a custom short-Weierstrass curve (``3`` eq); such a suite"
        " MUST validate it completely (:func:`m2mgw.crypto.curves.validate_weierstrass`:"
        " prime field, non-singular, generator on the curve of prime order, cofactor, not"
        " anomalous, embedding degree) in :meth:`check_params` and refuse anything else."
        "  False for every shipped suite."
    )

    # -- server key pairs ----------------------------------------------------

    def generate_server_key() -> Any:
        """
        Create a fresh server key pair for this suite.

        :return: an opaque key object usable with :meth:`agree`,
            :meth:`static_agree`, :meth:`sign`, :meth:`server_public` and
            :meth:`dump_server_key`.  For ``x25519`` it holds an X25519 and an
            Ed25519 pair.
        """

    def dump_server_key(key: Any) -> bytes:
        """
        Serialise a server key pair as unencrypted PKCS#8 PEM (one or more PEM
        blocks) for a file of mode 0600.
        """

    def load_server_key(data: bytes) -> Any:
        """
        Parse what :meth:`dump_server_key` wrote (or PKCS#8 DER/PEM from a
        provisioning system).

        :raise m2mgw.errors.BadKey: the data is not a private key of this suite.
        """

    def server_public(key: Any) -> tuple[bytes, bytes | None]:
        """
        :return: ``(public, sig_public)``: the key-agreement (or RSA) public key
            in wire encoding, and for ``x25519`` the Ed25519 signature public key
            (``None`` for the other suites, where one pair does both).
        """

    # -- key agreement / transport (HELLO ``epk``) ---------------------------

    def agree(server_key: Any, epk: bytes) -> bytes:
        """
        Gateway side of ``Z_es``: ECDH of the server private key with the
        module's ephemeral public key (x-coordinate, or the X25519 output), or
        for ``rsa`` the OAEP decryption of ``epk``.

        :raise m2mgw.errors.BadPoint: ``epk`` is not a valid public key
            (hybrid, off the curve, all-zero X25519 output).
        :raise m2mgw.errors.CryptoError: RSA decryption failed or did not yield 32 bytes.
        """

    def encapsulate(server_public: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """
        Module side of ``Z_es``: draw an ephemeral key (or, for ``rsa``, a
        32-byte Z and an OAEP seed) from ``random``, in the order the test
        vectors list the draws.

        :return: ``(epk, Z_es)``.
        """

    def static_agree(private_key: Any, peer_public: bytes) -> bytes:
        """
        ``Z_ss`` for SDH authentication: static-static ECDH, x-coordinate.
        Used by the gateway (server key, module public key) and by a module
        (module key, server public key).

        :raise m2mgw.errors.UnsupportedOperation: the suite has no SDH.
        :raise m2mgw.errors.BadPoint: ``peer_public`` is invalid.
        """

    # -- signatures -----------------------------------------------------------

    def generate_signing_key(random: RandomSource | None = None) -> Any:
        """
        Create a module key pair of this suite (ECDSA key of the suite's curve,
        Ed25519 for ``x25519``, RSA-2048 for ``rsa``).  With ``random`` the key
        is derived from one draw (EC: field size + 8 bytes, 40 for P-256 and
        56 for P-384, ``d = m mod (n-1) + 1``; Ed25519: 32 bytes as the seed);
        RSA keys always use the system source (``rsa`` draws and discards 32
        bytes so that later draws line up with the vectors' ``key_material``).
        """

    def load_signing_key(data: bytes) -> Any:
        """
        Parse a PKCS#8 (DER or PEM) private key of this suite's module keys.

        :raise m2mgw.errors.BadKey: not such a key.
        """

    def dump_signing_key(key: Any) -> bytes:
        """Serialise a module private key as unencrypted PKCS#8 DER."""

    def signing_public(key: Any) -> bytes:
        """The wire encoding of a signing key's public half (SEC1 uncompressed for EC)."""

    def sign(private_key: Any, data: bytes, random: RandomSource | None = None) -> bytes:
        """
        Sign ``data`` with the suite's algorithm: ECDSA with RFC 6979
        deterministic nonces as raw ``r || s``, Ed25519, or RSA-PSS (SHA-256,
        MGF1-SHA-256, 32-byte salt drawn from ``random`` when given).
        ``private_key`` is a signing key or a server key.
        """

    def verify(public_key: bytes, signature: bytes, data: bytes) -> None:
        """
        Check ``signature`` over ``data`` under ``public_key`` (wire encoding).

        :raise m2mgw.errors.BadSignature: it does not verify (wrong length included).
        :raise m2mgw.errors.BadKey: ``public_key`` is not acceptable.
        """

    def validate_public_key(public_key: bytes) -> None:
        """
        Check that ``public_key`` is an acceptable module key of this suite.

        :raise m2mgw.errors.BadKey: it is not.
        """

    # -- KDF, MAC and AEAD -------------------------------------------------------

    def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
        """RFC 5869 HKDF-Extract with the suite's hash."""

    def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
        """RFC 5869 HKDF-Expand with the suite's hash."""

    def hmac(key: bytes, data: bytes) -> bytes:
        """HMAC with the suite's hash."""

    def seal(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AEAD encryption; returns ciphertext followed by the tag (RFC 5116)."""

    def open(key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """
        AEAD decryption.

        :raise m2mgw.errors.BadTag: authentication failed (or ``ciphertext`` is
            shorter than the tag).
        """

    # -- parameter sets (MGP/1 §9) ----------------------------------------------

    def check_params(params: Mapping[int, Any]) -> None:
        """
        Validate a Params map (integer keys as in MGP/1 §9) for this suite:
        the named curve is the suite's, ``rsa_bits`` is in range, ``hash``
        matches; a custom curve ``eq`` is accepted only by a suite that
        declares :attr:`supports_custom_curves` and validates it fully
        (never together with a named ``curve``).

        :raise m2mgw.errors.BadParameters: with a reason a person can read.
        """


class IModuleStore(Interface):
    """
    The module database: everything a gateway node needs to answer any module.

    Every method returns a :class:`~twisted.internet.defer.Deferred`; no
    method blocks the reactor thread.  A multi-row change happens in one
    transaction: it is durable (on disk for the persistent stores) when the
    Deferred fires, and all of it or none of it is visible to a reader or
    another node.  Methods that find nothing return ``None`` or an empty
    list; those that refuse a change fail the Deferred with the
    :mod:`m2mgw.errors` type named.  Records are the frozen dataclasses of
    :mod:`m2mgw.records`.  Times are supplied by the caller (``now``).  A
    read issued after a write's Deferred fired sees that write; one issued
    before may not.

    Every change of an instruction's state and every key recorded or changed
    by the store appends, in the same transaction, an application event
    (``instruction``: ``{"iid", "state", "kind", "exec_ts", "status",
    "attempts"}``, addressed to the submitting application, or to the module's
    applications when ``source`` is ``operator``, ``spool`` or ``gateway``;
    ``key``: ``{"event", "kid", "status", "suite"}``, to the module's
    applications, ``event`` being ``registered`` (a key recorded ``pending``),
    ``activated``, ``retired``, ``expired`` or ``revoked`` after the key's
    new ``status``).  Queuing a ``keygen`` instruction appends a ``key``
    event ``requested`` (``{"event", "kid", "status": null, "suite", "pid",
    "iid", "source"}``, from the instruction's Params).  Callers do not
    append these themselves.

    A module ``pending-approval`` authenticates, but its accepted messages
    claim no instructions and the ``report`` and ``alert`` events their
    payloads raise are held, not appended, until :meth:`decide_approval`
    releases (or forgets) them; its first accepted HELLO appends a
    ``module`` event ``{"event": "pending-approval", "module", "kid",
    "suite", "group", "at"}``.  The first accepted HELLO of any other
    module appends the same with ``"event": "first-seen"``.
    """

    name = Attribute("The store's configuration name, e.g. ``'sqlite'``.")

    # -- lifecycle -------------------------------------------------------------

    def open() -> Deferred[None]:
        """Connect, create or migrate the schema.  Idempotent."""

    def close() -> Deferred[None]:
        """Finish every queued write, flush, and release resources.  Idempotent."""

    def schema_version() -> Deferred[int]:
        """The schema migration level (0 for stores with no schema)."""

    # -- modules and PSKs --------------------------------------------------------

    def add_modules(
        modules: Sequence[Any],
        keys: Sequence[Any] = (),
        apps: Mapping[str, Sequence[str]] | None = None,
    ) -> Deferred[None]:
        """
        Add :class:`~m2mgw.records.Module` records and, optionally, their
        initial :class:`~m2mgw.records.ModuleKey` records and the applications
        each module belongs to (module identity -> application names), all or none.

        :raise m2mgw.errors.DuplicateModule: an identity exists or repeats.
        :raise m2mgw.errors.KeyConflict: a key repeats a ``(module_id, kid)``.
        :raise m2mgw.errors.UnknownModule: a key names a module not being added
            and not present.
        """

    def get_module(module_id: str) -> Deferred[Any]:
        """The :class:`~m2mgw.records.Module`, or ``None``."""

    def list_modules(offset: int = 0, limit: int = 1000) -> Deferred[list[Any]]:
        """Modules ordered by identity."""

    def count_modules() -> Deferred[int]:
        """How many modules are provisioned."""

    def set_module_status(module_id: str, status: Any, now: int | None = None) -> Deferred[None]:
        """
        Set a :class:`~m2mgw.records.ModuleStatus`.  Disabling a module ends its
        session at once.  Given ``now``, a change of status appends a
        ``module`` event ``{"event": <the new status>, "module", "at"}``.

        :raise m2mgw.errors.UnknownModule:
        """

    def decide_approval(module_id: str, approve: bool, now: int) -> Deferred[Any]:
        """
        Approve or refuse a module waiting for approval (``pending-approval``),
        in one transaction.  Approving makes it ``enabled`` and appends a
        ``module`` event ``{"event": "approved", "module", "at"}``, then the
        events its messages raised while it waited, in their order;
        refusing makes it ``disabled``, ends its session, forgets those held
        events (its stored reports stay, for audit) and appends a ``module``
        event ``{"event": "disabled", "module", "at"}``.

        :return: the updated :class:`~m2mgw.records.Module`.
        :raise m2mgw.errors.UnknownModule:
        :raise m2mgw.errors.InvalidTransition: the module is not waiting for approval.
        """

    # -- the key series ------------------------------------------------------------

    def add_key(key: Any) -> Deferred[None]:
        """
        Record a :class:`~m2mgw.records.ModuleKey` (with its ``key`` event).

        :raise m2mgw.errors.UnknownModule:
        :raise m2mgw.errors.KeyConflict: the ``kid`` is taken.
        """

    def get_key(module_id: str, kid: int) -> Deferred[Any]:
        """The :class:`~m2mgw.records.ModuleKey`, or ``None``."""

    def list_keys(module_id: str) -> Deferred[list[Any]]:
        """Every key the module ever had, ``kid`` ascending."""

    def set_key_status(module_id: str, kid: int, status: Any, now: int) -> Deferred[None]:
        """
        Move a key to ``status``, stamping ``activated_at`` (active) or
        ``retired_at`` (retired, expired, revoked; kept if already set), with
        its ``key`` event if the status changed.  Revoking a key ends every
        session it opened, at once.

        :raise m2mgw.errors.UnknownKey:
        """

    def keys_due_for_rotation(query: Any, limit: int = 1000) -> Deferred[list[Any]]:
        """
        The ``active`` :class:`~m2mgw.records.ModuleKey` of each module a
        :class:`~m2mgw.records.RotationQuery` selects (enabled, no rotation
        under way, the key due by age, expiry or suite), at most ``limit``,
        by module identity ascending: page on with ``query.after_module``.
        """

    # -- server key references -------------------------------------------------------

    def add_server_key(key: Any) -> Deferred[None]:
        """
        Record a :class:`~m2mgw.records.ServerKey`.

        :raise m2mgw.errors.KeyConflict: the ``skid`` is taken.
        """

    def list_server_keys() -> Deferred[list[Any]]:
        """Every server key reference, ``skid`` ascending."""

    def set_server_key_status(
        skid: int, status: Any, retire_after: int | None = None
    ) -> Deferred[None]:
        """
        Set a :class:`~m2mgw.records.ServerKeyStatus` and, if given (not
        ``None``), the key's ``retire_after`` deadline (kept otherwise).

        :raise m2mgw.errors.UnknownKey:
        """

    # -- sessions, replay state and aliases (the per-datagram path) -------------------

    def accept_hello(commit: Any) -> Deferred[Any]:
        """
        Accept an authenticated HELLO atomically, as
        :class:`~m2mgw.records.HelloCommit` describes, in one transaction:

        1. the ``ts`` compare-and-set: ``ts`` must exceed the module's
           ``last_hello_ts``; the credential must still be valid (the module
           not disabled; for ``session.kid`` >= 1, that key active or pending),
           since an operator may have withdrawn it after the engine checked;
        2. the session swap: the module's earlier session ends, ``session`` is
           stored (a ``sid`` held by another module's expired session is taken over);
        3. if key ``session.kid`` is pending it becomes active, and every older
           active or pending key retired (``kid`` 0, the PSK, activates nothing;
           with ``expired_key_grace`` the key may be ``expired`` and nothing changes);
        4. ``alias`` replaces the module's previous alias;
        5. ``effects`` are applied: the report stored, the engine's events
           appended, confirmations applied (an instruction in state ``sent``
           becomes ``confirmed``; any other is ignored and counted), ``new_key``
           recorded as given unless its ``kid`` is taken, ``new_instructions``
           queued as :meth:`enqueue` does;
        6. instructions are claimed per ``delivery`` (if given): among the
           module's ``queued`` and ``sent`` ones -- first those just created
           by ``effects``, then the others, each ``iid`` ascending -- one past
           its ``not_after`` becomes ``expired``, one that rode
           ``max_attempts`` times ``failed``; the others ride while the sum of
           their ``wire_size`` fits the budget, stopping at the first that
           does not (``more``); each that rides becomes ``sent``, one attempt more.
           A module ``pending-approval`` claims nothing (and its ``report``
           and ``alert`` events are held; see the class docstring).

        Each instruction state change and key change appends its event (see
        the class docstring) and is listed in ``transitions``.

        :return: an :class:`~m2mgw.records.ExchangeResult`, or ``None`` (and
            nothing changed) if ``ts`` was not greater than the stored one or
            the credential was withdrawn.
        :raise m2mgw.errors.UnknownModule:
        :raise m2mgw.errors.StoreError: ``session.sid`` is held by another
            module's live session (draw another).
        """

    def get_session(sid: bytes) -> Deferred[Any]:
        """The :class:`~m2mgw.records.Session`, or ``None`` (also when ended)."""

    def get_module_session(module_id: str) -> Deferred[Any]:
        """The module's :class:`~m2mgw.records.Session` (expired or not), or ``None``."""

    def accept_data(commit: Any) -> Deferred[Any]:
        """
        Accept an authenticated DATA atomically, as
        :class:`~m2mgw.records.DataCommit` describes, in one transaction:
        the session must exist and not be expired at ``now``; ``ctr`` must
        pass :func:`m2mgw.protocol.replay.accept_counter`, whose new state is
        stored; then, if ``tok`` is among the module's remembered ones (the
        last 16 per module, across sessions), ``effects`` are not applied and
        the remembered outcome is returned as ``duplicate_outcome``; else
        ``effects`` are applied and ``(tok, outcome)`` remembered (an empty
        ``tok``, used for a malformed DataBody whose ``ctr`` only counts, is
        neither looked up nor remembered).  Effects and
        claiming are those of :meth:`accept_hello` (steps 5 and 6), with the
        same events and ``transitions``.

        :return: an :class:`~m2mgw.records.ExchangeResult`, or ``None`` (and
            nothing changed) if the session is gone or expired, or ``ctr``
            is replayed, below the window or beyond 2**63 - 1.
        """

    def end_session(sid: bytes) -> Deferred[None]:
        """End a session (no error if it is already gone)."""

    def resolve_alias(alias: bytes, now: int, consume: bool) -> Deferred[str | None]:
        """
        The module identity an unexpired alias stands for, or ``None``.  With
        ``consume`` the alias is forgotten in the same transaction (one-time aliases).
        """

    # -- instructions --------------------------------------------------------------------

    def enqueue(instruction: Any, now: int) -> Deferred[Any]:
        """
        Queue a :class:`~m2mgw.records.NewInstruction`, assigning the next
        ``iid`` of the module (increasing, never reused).  If ``source`` and
        ``idempotency_key`` match an earlier instruction, that one is
        returned and nothing is queued.

        :return: the :class:`~m2mgw.records.Instruction`.
        :raise m2mgw.errors.UnknownModule:
        """

    def enqueue_keygen(instruction: Any, now: int) -> Deferred[Any]:
        """
        Queue a ``keygen`` :class:`~m2mgw.records.NewInstruction` as
        :meth:`enqueue` does (with its ``key`` event ``requested``), unless
        a rotation is under way for the module: a ``queued`` or ``sent``
        ``keygen``, or a ``pending`` key.  One transaction, so two callers
        never queue two.

        :return: the :class:`~m2mgw.records.Instruction`, or ``None`` (nothing
            queued) if a rotation is under way.
        :raise m2mgw.errors.UnknownModule:
        """

    def get_instruction(module_id: str, iid: int) -> Deferred[Any]:
        """The :class:`~m2mgw.records.Instruction`, or ``None``."""

    def list_instructions(
        module_id: str | None = None, states: Sequence[Any] = (), limit: int = 1000
    ) -> Deferred[list[Any]]:
        """Instructions, oldest first, of one module or all, optionally by state."""

    def count_instructions(source: str, idempotency_key: str) -> Deferred[dict[str, int]]:
        """
        The progress of a campaign: how many instructions of every module
        with this ``source`` and ``idempotency_key`` are in each state, as
        ``{state value: count}`` with every :class:`~m2mgw.records.InstructionState`
        present (0 for none).  Used to follow an ``skey`` announcement
        (:mod:`m2mgw.keys.server_rollover`).
        """

    def cancel_instruction(module_id: str, iid: int, now: int) -> Deferred[Any]:
        """
        Cancel a ``queued`` or ``sent`` instruction (with its ``instruction``
        event); returns the updated record.

        :raise m2mgw.errors.UnknownInstruction:
        :raise m2mgw.errors.InvalidTransition: it is already final.
        """

    # -- application events (the durable outbox) ---------------------------------------------

    def set_module_apps(module_id: str, apps: Sequence[str]) -> Deferred[None]:
        """
        Set the applications a module belongs to (events are addressed to them).

        :raise m2mgw.errors.UnknownModule:
        """

    def get_module_apps(module_id: str) -> Deferred[list[str]]:
        """The applications of a module, sorted."""

    def append_events(events: Sequence[Any], now: int) -> Deferred[list[Any]]:
        """
        Append :class:`~m2mgw.records.NewEvent` records to the outbox in one
        transaction; each goes to its ``app`` or, if ``None``, to every
        application of its module (none: it is not stored).  Each application
        has its own gap-free sequence.

        :return: the :class:`~m2mgw.records.Event` records created.
        """

    def events_after(app: str, seq: int, limit: int = 100) -> Deferred[list[Any]]:
        """The application's events with a sequence number above ``seq``, ascending."""

    def ack_events(app: str, seq: int) -> Deferred[None]:
        """Acknowledge (and allow deletion of) the application's events up to ``seq``."""

    def acked_seq(app: str) -> Deferred[int]:
        """The highest acknowledged sequence number of the application (0: none)."""

    def outbox_position(app: str) -> Deferred[tuple[int, int]]:
        """``(acked_seq, last_seq)`` of the application (``(0, 0)``: no event yet)."""

    def outbox_apps() -> Deferred[list[str]]:
        """Every application that was ever given an event, sorted."""

    def trim_events(app: str, max_events: int, max_age: int, now: int) -> Deferred[Any]:
        """
        Enforce an application's retention limits, in one transaction: if it
        has more than ``max_events`` unacknowledged events, or some created
        more than ``max_age`` seconds before ``now`` (0: no such limit), the
        oldest are acknowledged (deleted) so that none is too old and, with
        the ``alert`` then appended, ``max_events`` remain; the alert
        (``{"origin": "gateway", "code": "events-dropped", "level",
        "text", "dropped", "first_seq", "last_seq"}``, to ``app`` alone)
        says which.

        :return: the alert :class:`~m2mgw.records.Event`, or ``None`` if
            nothing was dropped.
        """

    def list_app_modules(app: str, offset: int = 0, limit: int = 1000) -> Deferred[list[Any]]:
        """The :class:`~m2mgw.records.Module` records ``app`` belongs to, by identity."""

    def set_group_apps(group: str, apps: Sequence[str]) -> Deferred[int]:
        """
        Set the applications of every module of ``group`` (as
        :meth:`set_module_apps` does), in one transaction.

        :return: how many modules the group has.
        """

    def add_event_listener(listener: Callable[[frozenset[str]], object]) -> None:
        """
        Call ``listener`` (in the reactor thread) after every committed
        transaction of this store object that appended application events,
        with the applications that got them.  A store shared between
        processes may also report other processes' appends (the postgres
        store does, through ``NOTIFY``); a store that does not leaves readers
        to poll :meth:`events_after` for those.  A listener may be called more
        than once for one append.  A listener that raises is logged and the
        others are still called.
        """

    def remove_event_listener(listener: Callable[[frozenset[str]], object]) -> None:
        """Stop calling ``listener`` (no error if it is not registered)."""

    def list_reports(module_id: str, limit: int = 100) -> Deferred[list[Any]]:
        """The module's stored :class:`~m2mgw.records.Report` records, newest first."""

    # -- security events and audit ------------------------------------------------------------

    def record_security_events(events: Sequence[Any]) -> Deferred[None]:
        """Append :class:`~m2mgw.records.SecurityEvent` records."""

    def list_security_events(since: int = 0, limit: int = 1000) -> Deferred[list[Any]]:
        """Security events at or after ``since``, oldest first."""

    # -- housekeeping ----------------------------------------------------------------------------

    def expire(now: int) -> Deferred[dict[str, int]]:
        """
        Remove the sessions and aliases whose ``expires_at`` is at or before
        ``now``; mark ``expired`` the ``queued``/``sent`` instructions and the
        active or pending keys whose ``not_after`` is before ``now`` (each
        with its event).

        :return: counts by kind: ``{"sessions", "aliases", "instructions", "keys"}``.
        """

    def purge(before: Mapping[str, int], limit: int = 10_000) -> Deferred[dict[str, int]]:
        """
        Delete old records, at most ``limit`` of each kind in one call
        (call again while a count reaches ``limit``): per kind named in
        ``before``, the records older than the given time -- ``"reports"``
        (by ``received_at``), ``"security_events"`` (by ``at``) and
        ``"instructions"`` in a final state (by ``updated_at``; ``iid``s
        are never reused).  Nothing else changes and no event is appended.

        :return: how many were deleted, by kind.
        :raise ValueError: an unknown kind.
        """


class IModuleStoreFactory(Interface):
    """A plugin that makes a store from its configuration section."""

    name = Attribute("Configuration name, e.g. ``'sqlite'``; unique among stores.")
    options = Attribute("Mapping of the option names this store accepts to one-line descriptions.")
    external_service = Attribute(
        "``None`` for a store that needs nothing but its data directory; else a one-line"
        " description of the server it needs (e.g. ``'a PostgreSQL server'``).  The"
        " contract tests run such a store only when ``M2MGW_TEST_STORE_<NAME>`` holds"
        " its test options as a JSON object, and skip it otherwise."
    )

    def create(options: Mapping[str, str], data_dir: str, reactor: Any) -> IModuleStore:
        """
        Make an (unopened) store.

        :param options: the ``[store.NAME]`` section, keys already checked
            against :attr:`options`.
        :param data_dir: the gateway's data directory, for relative paths.
        :param reactor: the reactor whose thread the Deferreds fire in.
        :raise m2mgw.errors.ConfigError: a value is unusable.
        """


class IInstructionSink(Interface):
    """Where instruction sources deliver what they produce (the gateway's queue)."""

    def submit(instruction: Any) -> Deferred[Any]:
        """
        Queue a :class:`~m2mgw.records.NewInstruction`.

        :return: the queued :class:`~m2mgw.records.Instruction`.
        :raise m2mgw.errors.UnknownModule:
        """


class IInstructionSource(Interface):
    """
    Something that produces instructions for modules: application servers,
    the operator's spool directory, a polling bridge.  A source is started
    with the sink it feeds and stopped when the gateway stops; it must not
    lose an instruction it has acknowledged to its own producer.
    """

    name = Attribute(
        "The source's name, used in ``source`` of the instructions it queues -- unless"
        " the source queues on behalf of principals it authenticated (the application"
        " API: each instruction's ``source`` is the submitting application's principal,"
        " never the name of one of the gateway's own sources), which it documents."
    )

    def start(sink: IInstructionSink) -> Deferred[None] | None:
        """Begin producing into ``sink``."""

    def stop() -> Deferred[None] | None:
        """Stop producing; finish or hand back anything in flight."""


class IInstructionSourceFactory(Interface):
    """A plugin that makes an instruction source from its configuration section."""

    name = Attribute("Configuration name, e.g. ``'spool'``; unique among sources.")
    options = Attribute("Mapping of the option names this source accepts to one-line descriptions.")

    def create(options: Mapping[str, str], data_dir: str, reactor: Any) -> IInstructionSource:
        """
        Make a source.

        :raise m2mgw.errors.ConfigError: a value is unusable.
        """
