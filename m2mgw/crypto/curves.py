"""
Validation of custom short-Weierstrass curves: the ``eq`` of a Params map (MGP/1 §9).

A suite that declares ``supports_custom_curves`` accepts Params carrying
``3: [p, a, b, gx, gy, n, h]``, the curve ``y^2 = x^3 + a*x + b`` over the
prime field ``GF(p)`` with the base point ``G = (gx, gy)`` of prime order
``n`` and the cofactor ``h`` (the curve has ``h*n`` points).  Nothing of such
a set can be trusted: :func:`validate_weierstrass` checks it completely and
refuses anything else, following SEC 1 v2 §3.1.1.2.1 (the domain parameter
validation primitive) with the bounds below.  The checks, in the order made
(cheap ones first), each with its own reason in the
:class:`~m2mgw.errors.BadParameters` raised:

1. every value is an unsigned integer;
2. ``p`` has 224 to 1024 bits (224: the smallest field MGP/1 accepts; 1024
   bounds the work of validation);
3. ``p`` is prime (Baillie-PSW plus 32 Miller-Rabin rounds with random bases:
   no fixed set of bases is deterministic at these sizes, and a composite
   built to pass fixed bases -- Albrecht et al., "Prime and Prejudice",
   2018 -- does not pass random ones);
4. ``a``, ``b``, ``gx``, ``gy`` are reduced, in ``[0, p)``;
5. the curve is not singular: ``4a^3 + 27b^2 != 0 (mod p)``;
6. ``G`` is on the curve (``G`` is given in affine coordinates, so it is never
   the point at infinity);
7. ``n`` is prime;
8. ``n`` has at least 224 bits and ``n > 4*sqrt(p)``: then ``#E``, a multiple
   of ``n`` in the Hasse interval ``[p + 1 - 2*sqrt(p), p + 1 + 2*sqrt(p)]``
   (an interval narrower than ``n``), is that interval's only multiple of
   ``n``, so checking the cofactor below proves ``#E = h*n`` without counting
   points;
9. ``1 <= h <= 4`` (a small cofactor: SEC 1 allows ``h <= 2^(t/8)``; every
   curve worth using has 1, 2 or 4);
10. ``h*n`` is in the Hasse interval: ``(p + 1 - h*n)^2 <= 4p``, the exact
    form of SEC 1's ``h = floor((sqrt(p) + 1)^2 / n)``;
11. the curve is not anomalous: ``h*n != p`` (Smart's attack solves the
    discrete logarithm of a trace-one curve in polynomial time);
12. the embedding degree exceeds 100: ``p^k != 1 (mod n)`` for ``k = 1..100``
    (the MOV and Frey-Rück reductions move the discrete logarithm into
    ``GF(p^k)``; supersingular curves, ``k <= 2``, are refused here);
13. ``n*G`` is the point at infinity (``G`` has order ``n``: checked last,
    it is the costliest).

What is deliberately not checked: the SafeCurves criteria that concern
implementations or the origin of a curve rather than the hardness of its
discrete logarithm -- twist security (MGP/1 validates every received point,
so invalid-curve and twist attacks do not apply), the size of the complex
multiplication discriminant, and whether the constants are explained.

The point arithmetic here is plain Python on integers (Jacobian
coordinates): fine for validating a parameter set once, not for a session's
hot path, and not constant-time (it only ever handles public values).
"""

from __future__ import annotations

from math import isqrt

from m2mgw.crypto.randomness import system_random
from m2mgw.errors import BadParameters
from m2mgw.interfaces import RandomSource

__all__ = [
    "MAX_COFACTOR",
    "MAX_FIELD_BITS",
    "MIN_EMBEDDING_DEGREE",
    "MIN_FIELD_BITS",
    "MIN_ORDER_BITS",
    "JacobianPoint",
    "is_on_curve",
    "is_probable_prime",
    "scalar_multiply",
    "to_affine",
    "validate_weierstrass",
]

#: The smallest field accepted, in bits (about 112-bit security).
MIN_FIELD_BITS = 224
#: The largest field accepted, in bits: bounds the validation's work.
MAX_FIELD_BITS = 1024
#: The smallest subgroup order accepted, in bits.
MIN_ORDER_BITS = 224
#: The largest cofactor accepted.
MAX_COFACTOR = 4
#: The embedding degree must exceed this (SEC 1's MOV bound).
MIN_EMBEDDING_DEGREE = 100
#: Miller-Rabin rounds with random bases after Baillie-PSW.
RANDOM_ROUNDS = 32

#: A point in Jacobian coordinates ``(X, Y, Z)``, affine ``(X/Z^2, Y/Z^3)``; ``Z = 0`` is infinity.
JacobianPoint = tuple[int, int, int]

_INFINITY: JacobianPoint = (1, 1, 0)
_SMALL_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73)


# -- primality --------------------------------------------------------------------------


def _miller_rabin(n: int, base: int) -> bool:
    """One strong probable-prime test of odd ``n > 3`` to ``base``."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    x = pow(base, d, n)
    if x in (1, n - 1):
        return True
    for _ in range(s - 1):
        x = x * x % n
        if x == n - 1:
            return True
    return False


def _jacobi(a: int, n: int) -> int:
    """The Jacobi symbol ``(a/n)`` for odd positive ``n``."""
    a %= n
    result = 1
    while a:
        while a % 2 == 0:
            a //= 2
            if n % 8 in (3, 5):
                result = -result
        a, n = n, a
        if a % 4 == 3 and n % 4 == 3:
            result = -result
        a %= n
    return result if n == 1 else 0


def _half(x: int, n: int) -> int:
    """``x / 2 (mod n)`` for odd ``n``."""
    if x % 2:
        x += n
    return (x // 2) % n


def _strong_lucas(n: int) -> bool:
    """
    The strong Lucas probable-prime test with Selfridge's parameters
    (method A: the first ``D`` of 5, -7, 9, -11, ... with ``(D/n) = -1``,
    ``P = 1``, ``Q = (1 - D)/4``), for odd ``n > 3`` that is not a square.
    """
    d_value = 5
    while True:
        symbol = _jacobi(d_value, n)
        if symbol == -1:
            break
        if symbol == 0 and abs(d_value) != n:
            return False  # a factor of n
        d_value = -d_value - 2 if d_value > 0 else -d_value + 2
    p_value, q_value = 1, (1 - d_value) // 4
    d, s = n + 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    # U_1, V_1, Q^1, then the bits of d below the top one: double, and add one where set.
    u, v, qk = 1, p_value % n, q_value % n
    for bit in bin(d)[3:]:
        u, v = u * v % n, (v * v - 2 * qk) % n
        qk = qk * qk % n
        if bit == "1":
            u, v = _half(p_value * u + v, n), _half(d_value * u + p_value * v, n)
            qk = qk * q_value % n
    if u == 0 or v == 0:
        return True
    for _ in range(s - 1):
        v = (v * v - 2 * qk) % n
        qk = qk * qk % n
        if v == 0:
            return True
    return False


def _random_base(n: int, random: RandomSource) -> int:
    """A uniformly drawn base in ``[2, n - 2]``."""
    span = n - 3
    size = (span.bit_length() + 7) // 8 + 8  # 64 extra bits make the modulo bias negligible
    return 2 + int.from_bytes(random(size), "big") % span


def is_probable_prime(
    n: int, random: RandomSource = system_random, rounds: int = RANDOM_ROUNDS
) -> bool:
    """
    Whether ``n`` is prime: trial division, then Baillie-PSW (Miller-Rabin
    to base 2 and a strong Lucas test; no composite is known to pass it),
    then ``rounds`` Miller-Rabin tests to bases drawn from ``random`` (each
    passed by a composite with probability at most 1/4).

    :param random: the source of the random bases.
    """
    if n < 2:
        return False
    if n in (2, 3):
        return True
    if n % 2 == 0:
        return False
    for prime in _SMALL_PRIMES:
        if n == prime:
            return True
        if n % prime == 0:
            return False
    if not _miller_rabin(n, 2):
        return False
    root = isqrt(n)
    if root * root == n or not _strong_lucas(n):
        return False
    return all(_miller_rabin(n, _random_base(n, random)) for _ in range(rounds))


# -- point arithmetic (public values only) ---------------------------------------------------


def is_on_curve(x: int, y: int, p: int, a: int, b: int) -> bool:
    """Whether the affine point ``(x, y)`` satisfies ``y^2 = x^3 + a*x + b (mod p)``."""
    return (y * y - (x * x * x + a * x + b)) % p == 0


def _double(point: JacobianPoint, p: int, a: int) -> JacobianPoint:
    x, y, z = point
    if z == 0 or y == 0:
        return _INFINITY
    yy = y * y % p
    s = 4 * x * yy % p
    zz = z * z % p
    m = (3 * x * x + a * zz * zz) % p
    x3 = (m * m - 2 * s) % p
    y3 = (m * (s - x3) - 8 * yy * yy) % p
    z3 = 2 * y * z % p
    return (x3, y3, z3)


def _add(first: JacobianPoint, second: JacobianPoint, p: int, a: int) -> JacobianPoint:
    x1, y1, z1 = first
    x2, y2, z2 = second
    if z1 == 0:
        return second
    if z2 == 0:
        return first
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(first, p, a) if s1 == s2 else _INFINITY
    h = (u2 - u1) % p
    r = (s2 - s1) % p
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - s1 * hhh) % p
    z3 = h * z1 * z2 % p
    return (x3, y3, z3)


def scalar_multiply(k: int, x: int, y: int, p: int, a: int) -> JacobianPoint:
    """
    ``k * (x, y)`` on the curve with coefficient ``a`` over ``GF(p)``, by
    double-and-add (variable time: public values only).

    :return: Jacobian coordinates; ``Z == 0`` is the point at infinity.
    """
    if k < 0:
        raise ValueError("negative scalar")
    base: JacobianPoint = (x % p, y % p, 1)
    result = _INFINITY
    for bit in bin(k)[2:]:
        result = _double(result, p, a)
        if bit == "1":
            result = _add(result, base, p, a)
    return result


def to_affine(point: JacobianPoint, p: int) -> tuple[int, int] | None:
    """The affine coordinates of ``point``, or ``None`` for the point at infinity."""
    x, y, z = point
    if z % p == 0:
        return None
    z_inv = pow(z, -1, p)
    zz = z_inv * z_inv % p
    return (x * zz % p, y * zz * z_inv % p)


# -- validation ------------------------------------------------------------------------------


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_weierstrass(
    p: int,
    a: int,
    b: int,
    gx: int,
    gy: int,
    n: int,
    h: int,
    *,
    random: RandomSource = system_random,
) -> None:
    """
    Check a custom short-Weierstrass curve completely (the module docstring
    lists every check and why).

    :param random: the source of the Miller-Rabin bases.
    :raise m2mgw.errors.BadParameters: the first check that fails, with a
        reason naming it.
    """
    values = {"p": p, "a": a, "b": b, "gx": gx, "gy": gy, "n": n, "h": h}
    for name, value in values.items():
        if not _is_uint(value):
            raise BadParameters(f"custom curve: {name} must be an unsigned integer")
    bits = p.bit_length()
    if bits < MIN_FIELD_BITS:
        raise BadParameters(
            f"custom curve: the field prime has {bits} bits, fewer than {MIN_FIELD_BITS}"
        )
    if bits > MAX_FIELD_BITS:
        raise BadParameters(
            f"custom curve: the field prime has {bits} bits, more than {MAX_FIELD_BITS}"
        )
    if not is_probable_prime(p, random):
        raise BadParameters("custom curve: p is not prime (not a prime field)")
    for name in ("a", "b", "gx", "gy"):
        if values[name] >= p:
            raise BadParameters(f"custom curve: {name} is not reduced modulo p")
    if (4 * a * a * a + 27 * b * b) % p == 0:
        raise BadParameters("custom curve: singular (4a^3 + 27b^2 = 0 mod p)")
    if not is_on_curve(gx, gy, p, a, b):
        raise BadParameters("custom curve: the generator is not on the curve")
    if not is_probable_prime(n, random):
        raise BadParameters("custom curve: the order n of the generator is not prime")
    if n.bit_length() < MIN_ORDER_BITS:
        raise BadParameters(
            f"custom curve: the order n has {n.bit_length()} bits, fewer than {MIN_ORDER_BITS}"
        )
    if n * n <= 16 * p:
        raise BadParameters("custom curve: the order n is not above 4*sqrt(p)")
    if not 1 <= h <= MAX_COFACTOR:
        raise BadParameters(f"custom curve: cofactor {h} is not between 1 and {MAX_COFACTOR}")
    trace = p + 1 - h * n
    if trace * trace > 4 * p:
        raise BadParameters(
            "custom curve: the cofactor does not match (h*n is outside the Hasse bound"
            " |p + 1 - h*n| <= 2*sqrt(p))"
        )
    if h * n == p:
        raise BadParameters("custom curve: anomalous (h*n = p; Smart's attack)")
    power = 1
    for degree in range(1, MIN_EMBEDDING_DEGREE + 1):
        power = power * p % n
        if power == 1:
            raise BadParameters(
                f"custom curve: embedding degree {degree} is at most {MIN_EMBEDDING_DEGREE}"
                " (p^k = 1 mod n; MOV/Frey-Rueck attack)"
            )
    if scalar_multiply(n, gx, gy, p, a)[2] != 0:
        raise BadParameters("custom curve: n*G is not the point at infinity (G has not order n)")
