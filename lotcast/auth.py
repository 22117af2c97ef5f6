"""HS256 JWTs with four roles: host, moderator, bidder, viewer (anonymous watchers carry no token)."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
ISSUER = "lotcast"


class Role(enum.StrEnum):
    HOST = "host"
    BIDDER = "bidder"
    MODERATOR = "moderator"  # chat moderation in every room (the host may revoke it per room)
    VIEWER = "viewer"


@dataclass(frozen=True)
class Identity:
    role: Role
    user_id: str
    display_name: str

    @property
    def anonymous(self) -> bool:
        return self.role is Role.VIEWER


ANONYMOUS = Identity(role=Role.VIEWER, user_id="", display_name="")


class AuthError(Exception):
    """A request's credentials were missing (401), invalid (401) or insufficient (403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TokenAuthority:
    """Mints and verifies the platform's JWTs with one shared secret."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("JWT secret must be at least 32 characters")
        self._secret = secret

    def mint(
        self,
        role: Role,
        user_id: str | None = None,
        display_name: str | None = None,
        ttl: float = 12 * 3600,
    ) -> str:
        now = int(time.time())
        uid = user_id or f"{role.value}-{uuid.uuid4().hex[:8]}"
        claims = {
            "iss": ISSUER,
            "sub": uid,
            "role": role.value,
            "name": display_name or uid,
            "iat": now,
            "exp": now + int(ttl),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "sub", "role"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(401, "token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {exc}") from exc
        try:
            role = Role(claims["role"])
        except ValueError as exc:
            raise AuthError(401, f"invalid token: unknown role {claims['role']!r}") from exc
        return Identity(role=role, user_id=str(claims["sub"]), display_name=str(claims.get("name", "")))

    def from_authorization(self, header: str | None, required: Role | None) -> Identity:
        """Check an HTTP ``Authorization`` header.

        ``required`` None means anonymous access is allowed: a missing header yields ANONYMOUS,
        but a present, broken one is still refused.
        """
        if not header:
            if required is None:
                return ANONYMOUS
            raise AuthError(401, "missing Authorization: Bearer token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "Authorization header must be 'Bearer <token>'")
        identity = self.verify(token.strip())
        if required is not None and identity.role is not required:
            raise AuthError(
                403, f"token role {identity.role.value!r} may not do this; needs {required.value!r}"
            )
        return identity
