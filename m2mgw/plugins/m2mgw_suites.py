"""
The five cipher suites m2mgw ships (MGP/1 §3), as plugins.

Each object here provides :class:`twisted.plugin.IPlugin` and
:class:`m2mgw.interfaces.ICipherSuite`; :func:`m2mgw.registry.lookup` finds
them by name (``p256``, ``p256-ccm8``, ``p384``, ``x25519``, ``rsa``).  A
third-party suite is a module like this one that defines its own objects.
"""

from __future__ import annotations

from m2mgw.crypto.ec import P256, P256_CCM8, P384
from m2mgw.crypto.rsa import RSA
from m2mgw.crypto.x25519 import X25519

__all__ = ["p256", "p256_ccm8", "p384", "rsa", "x25519"]

p256 = P256
p256_ccm8 = P256_CCM8
p384 = P384
x25519 = X25519
rsa = RSA
