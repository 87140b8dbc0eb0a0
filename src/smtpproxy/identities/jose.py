"""JSON Web Token checks, pure: parse, verify the signature with a JWKS key, check claims.

Only asymmetric algorithms are accepted (RS256/384/512, PS256/384/512,
ES256/384/512), each with the key type it belongs to: a token cannot
choose C{none}, an HMAC algorithm (the classic confusion, where an RSA
public key is used as the HMAC secret) or an RSA algorithm against an EC
key.  Signatures are verified with C{cryptography}.  Every failure is a
L{TokenError} with a reason for the log; none of it says which part of a
token was right.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_TOKEN_CHARS = 16_384
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES = {"ES256": ("P-256", 32), "ES384": ("P-384", 48), "ES512": ("P-521", 66)}
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class TokenError(Exception):
    """The token is malformed, badly signed or its claims do not match."""


@dataclass(frozen=True, slots=True)
class Token:
    """A parsed, not yet verified token."""

    header: Mapping[str, object]
    claims: Mapping[str, object]
    signed: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        value = self.header.get("alg")
        return value if isinstance(value, str) else ""

    @property
    def kid(self) -> str | None:
        value = self.header.get("kid")
        return value if isinstance(value, str) else None


def _b64(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(data)
    except ValueError:
        raise TokenError(f"{what} is not JSON") from None
    except RecursionError:
        # A few thousand nested brackets fit in a token and exhaust the
        # decoder's stack: malformed input like any other, so a refusal.
        raise TokenError(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise TokenError(f"{what} is not a JSON object")
    return value


def parse(token: str) -> Token:
    """Split and decode a compact JWS; refuse anything but a signed, supported algorithm."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    parts = token.strip().split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError("not a compact JWS (three dot-separated parts)")
    header = _json_object(_b64(parts[0]), "header")
    claims = _json_object(_b64(parts[1]), "payload")
    parsed = Token(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), _b64(parts[2]))
    if parsed.alg not in ALGORITHMS:
        # "none", HS256 and friends: never, whatever the key set holds.
        raise TokenError(f"algorithm {parsed.alg[:20]!r} not accepted")
    if "crit" in header:
        raise TokenError("critical header extensions are not supported")
    if not parsed.signature:
        raise TokenError("unsigned token")
    return parsed


def _int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url integer")
    return int.from_bytes(_b64(value), "big")


@dataclass(frozen=True, slots=True)
class JWK:
    """A verification key from a key set, with the one algorithm it is published for.

    RFC 8725 3.1: each key is used with exactly one algorithm, checked when
    the signature is.  C{alg} is the JWK's own C{alg} (RFC 7517 4.4); None
    when the key set does not name one (then the key type still limits the
    algorithms, see L{verify_signature}).
    """

    key: PublicKey
    alg: str | None = None


def load_jwk(jwk: Mapping[str, object]) -> JWK | None:
    """A public key from one JWKS entry, or None for keys we do not use.

    Not used: symmetric and private keys, keys for another use (C{use}
    other than C{sig}, C{key_ops} without C{verify}) and keys published for
    an algorithm we do not accept.
    """
    kty = jwk.get("kty")
    if jwk.get("use") not in (None, "sig"):
        return None
    ops = jwk.get("key_ops")
    if ops is not None and not (isinstance(ops, list) and "verify" in ops):
        return None
    alg = jwk.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        return None
    try:
        if kty == "RSA":
            rsa_key = rsa.RSAPublicNumbers(_int(jwk.get("e")), _int(jwk.get("n"))).public_key()
            return JWK(rsa_key, alg)
        if kty == "EC":
            curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
            curve = curves.get(str(jwk.get("crv")))
            if curve is None:
                return None
            numbers = ec.EllipticCurvePublicNumbers(_int(jwk.get("x")), _int(jwk.get("y")), curve)
            return JWK(numbers.public_key(), alg)
    except (ValueError, TokenError):
        return None
    # "oct" (a shared secret) and anything else: never a verification key here.
    return None


def verify_signature(token: Token, key: PublicKey | JWK) -> None:
    """Check C{token}'s signature with C{key}, whose type (and C{alg}) must fit the algorithm."""
    alg = token.alg
    if isinstance(key, JWK):
        if key.alg is not None and key.alg != alg:
            raise TokenError(f"{alg} used with a key published for {key.alg}")
        key = key.key
    digest = _HASHES[alg[2:]]()
    try:
        if alg.startswith(("RS", "PS")):
            if not isinstance(key, rsa.RSAPublicKey):
                raise TokenError(f"{alg} needs an RSA key")
            if key.key_size < 2048:
                raise TokenError("RSA key shorter than 2048 bits")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg.startswith("RS")
                else padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)
            )
            key.verify(token.signature, token.signed, pad, digest)
            return
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TokenError(f"{alg} needs an EC key")
        curve, size = _CURVES[alg]
        if (
            key.curve.name
            != {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}[curve]
        ):
            raise TokenError(f"{alg} needs a {curve} key")
        if len(token.signature) != 2 * size:
            raise TokenError("EC signature of the wrong length")
        r = int.from_bytes(token.signature[:size], "big")
        s = int.from_bytes(token.signature[size:], "big")
        key.verify(encode_dss_signature(r, s), token.signed, ec.ECDSA(digest))
    except InvalidSignature:
        raise TokenError("bad signature") from None


def same(a: object, b: object) -> bool:
    """JSON equality without Python's C{True == 1} and C{1 == 1.0}: types must agree too."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@dataclass(frozen=True, slots=True)
class Expected:
    """What the claims must say; empty fields are not checked."""

    issuer: str = ""
    audience: str = ""
    subject: str = ""
    claims: Mapping[str, object] | None = None
    leeway: float = 30.0


def _time(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"{name} is not a number")
    return float(value)


def valid_until(claims: Mapping[str, object], expected: Expected) -> float:
    """When a token whose claims passed L{check_claims} stops being accepted: C{exp} + leeway."""
    expires = _time(claims, "exp")
    if expires is None:
        raise TokenError("no exp claim")
    return expires + expected.leeway


def check_claims(claims: Mapping[str, object], expected: Expected, now: float) -> str:
    """Check time and identity claims; return the subject (the identity's user)."""
    expires = _time(claims, "exp")
    if expires is None:
        raise TokenError("no exp claim")
    if now > expires + expected.leeway:
        raise TokenError("expired")
    not_before = _time(claims, "nbf")
    if not_before is not None and now + expected.leeway < not_before:
        raise TokenError("not yet valid")
    issued = _time(claims, "iat")
    if issued is not None and now + expected.leeway < issued:
        raise TokenError("issued in the future")
    if expected.issuer and claims.get("iss") != expected.issuer:
        raise TokenError("wrong issuer")
    if expected.audience:
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if expected.audience not in [a for a in audiences if isinstance(a, str)]:
            raise TokenError("wrong audience")
    subject = claims.get("sub")
    if expected.subject and subject != expected.subject:
        raise TokenError("wrong subject")
    for name, value in (expected.claims or {}).items():
        if name not in claims or not same(claims[name], value):
            raise TokenError(f"claim {name[:40]!r} does not match")
    return subject if isinstance(subject, str) and subject else "token"
