"""API keys and the short-lived JWTs the SDKs exchange them for.

JWT exchange is always on: MinT's `sk-` keys only work that way, and plain `tml-` keys work either
way. A key maps to an owner; with no keys configured (loopback only) every key is the one local owner.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class Unauthorized(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    def __init__(self, keys: dict[str, str], secret: bytes, jwt_ttl_s: int = 3600) -> None:
        """`keys` maps API key -> owner; empty means open (any well-formed key is the local owner)."""
        self.keys = keys
        self.secret = secret
        self.jwt_ttl_s = jwt_ttl_s

    def owner_of_key(self, key: str | None) -> str:
        if not key or not key.isprintable() or len(key) > 4096:
            raise Unauthorized("missing or malformed X-API-Key header")
        if not self.keys:
            return "local"
        owner = self.keys.get(key)
        if owner is None:
            raise Unauthorized("unknown API key")
        return owner

    def sign(self, claims: dict[str, Any], ttl_s: int) -> str:
        """A token (HS256 JWT) carrying `claims` until `ttl_s` from now."""
        now = int(time.time())
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps({**claims, "iat": now, "exp": now + ttl_s}).encode())
        signature = _b64(hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        return f"{header}.{payload}.{signature}"

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token `sign` made and that has not expired; Unauthorized otherwise."""
        try:
            header, payload, signature = token.split(".")
            expected = _b64(hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
            if not hmac.compare_digest(signature, expected):
                raise Unauthorized("invalid token")
            claims = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("invalid token") from None
        if claims.get("exp", 0) < time.time():
            raise Unauthorized("token expired")
        return claims

    def issue(self, owner: str) -> str:
        """The JWT an SDK exchanges its API key for."""
        return self.sign({"sub": owner}, self.jwt_ttl_s)

    def owner(self, credential: str | None) -> str:
        """Owner for a request's X-API-Key: one of our JWTs, or a raw API key."""
        if credential and credential.startswith("eyJ") and credential.count(".") == 2:
            claims = self.verify(credential)
            if "aud" in claims:  # a download link's token is not an API credential
                raise Unauthorized("invalid token")
            return claims["sub"]
        return self.owner_of_key(credential)
