"""
The MGP/1 cipher suites (spec §3), one module per algorithm family.

- :mod:`m2mgw.crypto.primitives`: what every suite shares: HKDF, HMAC, the
  AEADs, PKCS#8 (de)serialisation and the Params check of MGP/1 §9.
- :mod:`m2mgw.crypto.ec`: ``p256``, ``p256-ccm8`` and ``p384`` (one class).
- :mod:`m2mgw.crypto.x25519`: ``x25519`` (X25519 agreement, Ed25519 signatures).
- :mod:`m2mgw.crypto.rsa`: ``rsa`` (OAEP key transport, PSS signatures).
- :mod:`m2mgw.crypto.randomness`: the injectable random sources.

The suites are found by name through :mod:`m2mgw.registry`
(``lookup(ICipherSuite, "p256")``); the plugin objects live in
:mod:`m2mgw.plugins.m2mgw_suites`.  Everything here is pure: no I/O, no reactor,
and third-party exceptions are translated to :mod:`m2mgw.errors`.
"""
