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

    def issue(self, owner: str) -> str:
        now = int(time.time())
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": owner, "iat": now, "exp": now + self.jwt_ttl_s}).encode())
        signature = _b64(hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        return f"{header}.{payload}.{signature}"

    def owner(self, credential: str | None) -> str:
        """Owner for a request's X-API-Key: one of our JWTs, or a raw API key."""
        if credential and credential.startswith("eyJ") and credential.count(".") == 2:
            header, payload, signature = credential.split(".")
            expected = _b64(hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
            if not hmac.compare_digest(signature, expected):
                raise Unauthorized("invalid token")
            claims = json.loads(_unb64(payload))
            if claims.get("exp", 0) < time.time():
                raise Unauthorized("token expired")
            return claims["sub"]
        return self.owner_of_key(credential)
