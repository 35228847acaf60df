"""Who is calling: JWT verification, locally (PyJWT) or against Jina Cloud (hubble).

Configured from the executor's `auth` settings or the environment:
  BIG_AUTH_MODE         hs256 (default) | rs256 | hubble | disabled
  BIG_JWT_SECRET        HS256 shared secret
  BIG_JWT_PUBLIC_KEY    RS256 public key (PEM text) or BIG_JWT_PUBLIC_KEY_FILE (path to PEM)
  BIG_JWT_AUDIENCE      optional expected `aud`
  BIG_JWT_ISSUER        optional expected `iss`
The user id is the token's `sub` claim. `disabled` is for local experiments only and logs loudly.
In hs256 mode with no secret given, the service uses the workspace's own, `<workspace>/.jwt_secret`, made (random,
readable by its owner only) at the first start that needs it: every process over one store agrees on it.

Mint a token for a user (HS256; the secret is BIG_JWT_SECRET, else the workspace's):
    python -m big.auth mint alice [--secret S] [--workspace DIR] [--days 30]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import secrets
import tempfile
import time

import jwt

from big.errors import AuthError

log = logging.getLogger(__name__)

# User ids: 1-128 letters, digits, '_', '.', '@', ':' or '-', starting with a letter or digit (never '.' or '..'),
# so an id reads the same in logs and paths; the workspace names folders by hashes of them anyway.
_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:\-]{0,127}$")
DEV_USER = "dev-user"
# A token with this claim set to true may list, retire and restore the public metamodel's concepts.
ADMIN_CLAIM = "big_admin"


@dataclasses.dataclass
class AuthConfig:
    mode: str = "hs256"
    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_s: int = 10

    @classmethod
    def from_env(cls, overrides: dict | None = None, workspace: str | None = None) -> "AuthConfig":
        """config.yml's `auth` settings over the environment's; in hs256 mode without a secret, `workspace`'s."""
        o = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
        key = o.get("public_key") or os.environ.get("BIG_JWT_PUBLIC_KEY")
        key_file = o.get("public_key_file") or os.environ.get("BIG_JWT_PUBLIC_KEY_FILE")
        if not key and key_file:
            with open(key_file) as f:
                key = f.read()
        mode = str(o.get("mode") or os.environ.get("BIG_AUTH_MODE", "hs256")).lower()
        secret = o.get("secret") or os.environ.get("BIG_JWT_SECRET")
        if mode == "hs256" and not secret and workspace is not None:
            secret = workspace_secret(workspace, create=True)
        return cls(
            mode=mode,
            secret=secret,
            public_key=key,
            audience=o.get("audience") or os.environ.get("BIG_JWT_AUDIENCE"),
            issuer=o.get("issuer") or os.environ.get("BIG_JWT_ISSUER"),
        )


SECRET_FILE = ".jwt_secret"


def workspace_secret(workspace: str, create: bool) -> str | None:
    """The workspace's HS256 secret, made first if `create` (atomically: two processes starting over one new store
    keep the one that was linked first); None if there is none and `create` is false."""
    path = os.path.join(workspace, SECRET_FILE)
    if create and not os.path.exists(path):
        os.makedirs(workspace, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=workspace, prefix=SECRET_FILE)  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
        try:
            os.link(tmp, path)
            log.warning("BIG_JWT_SECRET not set: made the workspace's own secret in %s; mint a token with "
                        "`python -m big.auth mint USER --workspace %s`", path, workspace)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


class Authenticator:
    def __init__(self, config: AuthConfig):
        self.config = config
        if config.mode not in ("hs256", "rs256", "hubble", "disabled"):
            raise ValueError(f"unknown auth mode {config.mode!r}")
        if config.mode == "hs256" and not config.secret:
            raise ValueError("auth mode hs256 needs BIG_JWT_SECRET, auth.secret in config.yml or a workspace")
        if config.mode == "rs256" and not config.public_key:
            raise ValueError("auth mode rs256 needs BIG_JWT_PUBLIC_KEY or BIG_JWT_PUBLIC_KEY_FILE")
        if config.mode == "disabled":
            log.warning("!!! AUTH IS DISABLED: every caller is %r and can use every concept of that user. "
                        "Never expose this server. !!!", DEV_USER)

    def user_from_parameters(self, parameters: dict) -> str:
        """The caller's user id, from `parameters['jwt']['token']` (the seed's client shape)."""
        return self.caller_from_parameters(parameters)[0]

    def admin_from_parameters(self, parameters: dict) -> str:
        """The caller's user id when the token carries the admin claim (`ADMIN_CLAIM: true`), else AuthError."""
        user, admin = self.caller_from_parameters(parameters)
        if not admin:
            raise AuthError(f"this needs an admin token (claim {ADMIN_CLAIM!r}: true; `python -m big.auth mint "
                            "<user> --admin`)")
        return user

    def caller_from_parameters(self, parameters: dict) -> tuple[str, bool]:
        """(user id, whether the token makes the caller an admin)."""
        if self.config.mode == "disabled":
            return DEV_USER, False
        token = None
        jwt_param = (parameters or {}).get("jwt")
        if isinstance(jwt_param, dict):
            token = jwt_param.get("token")
        elif isinstance(jwt_param, str):
            token = jwt_param
        if not token or not isinstance(token, str):
            raise AuthError("missing token: pass parameters={'jwt': {'token': '<JWT>'}}")
        if self.config.mode == "hubble":  # Jina Cloud tokens carry no claim of BIG's: never admins
            return self._verify_hubble(token), False
        claims = self._claims(token)
        return _checked_user_id(claims.get("sub")), claims.get(ADMIN_CLAIM) is True

    def verify(self, token: str) -> str:
        if self.config.mode == "hubble":
            return self._verify_hubble(token)
        return _checked_user_id(self._claims(token).get("sub"))

    def _claims(self, token: str) -> dict:
        algorithm = "HS256" if self.config.mode == "hs256" else "RS256"
        key = self.config.secret if algorithm == "HS256" else self.config.public_key
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience=self.config.audience, issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["sub", "exp"], "verify_aud": self.config.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(f"invalid token ({type(e).__name__})") from None
        return claims

    def _verify_hubble(self, token: str) -> str:
        """A Jina Cloud token: hubble checks its signature against Jina's JWKS (cached in hubble's
        config, else fetched) and, for a token without embedded user data, asks the Hubble API."""
        try:
            import hubble
        except ImportError as e:  # pragma: no cover - hubble is in requirements.txt
            raise AuthError("hubble auth selected but jina-hubble-sdk is not installed") from e
        try:
            user = hubble.Client(token=token, max_retries=1, jsonify=True).get_user_info(log_error=False,
                                                                                          variant="data")
        except Exception as e:  # hubble raises its own hierarchy; all mean "not a valid user"
            raise AuthError(f"Jina Cloud rejected the token ({type(e).__name__})") from None
        if not isinstance(user, dict) or user.get("status") not in ("active", "deletion-in-progress"):
            raise AuthError("Jina Cloud user is not active")
        return _checked_user_id(user.get("_id") or user.get("id"))


def _checked_user_id(sub) -> str:
    if not isinstance(sub, str) or not _USER_ID.match(sub):
        raise AuthError("token has no usable 'sub' claim")
    return sub


def mint_token(user_id: str, secret: str, *, days: float = 30.0, algorithm: str = "HS256",
               audience: str | None = None, issuer: str | None = None, now: float | None = None,
               admin: bool = False) -> str:
    now = time.time() if now is None else now
    claims = {"sub": _checked_user_id(user_id), "iat": int(now), "exp": int(now + days * 86400)}
    if admin:
        claims[ADMIN_CLAIM] = True
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)


def main():
    ap = argparse.ArgumentParser(description="Mint a JWT for a BIG user.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mint")
    m.add_argument("user_id")
    m.add_argument("--secret", default=os.environ.get("BIG_JWT_SECRET"),
                   help="HS256 secret (default $BIG_JWT_SECRET, else the workspace's); for RS256 a PEM private key file")
    m.add_argument("--workspace", default=os.environ.get("BIG_WORKSPACE", "workspace"),
                   help="whose .jwt_secret to use when no secret is given (default $BIG_WORKSPACE, else workspace)")
    m.add_argument("--rs256", action="store_true", help="--secret names a PEM private key file")
    m.add_argument("--days", type=float, default=30.0)
    m.add_argument("--audience")
    m.add_argument("--issuer")
    m.add_argument("--admin", action="store_true", help=f"an admin token ({ADMIN_CLAIM!r} claim: keeps the metamodel)")
    a = ap.parse_args()
    if not a.secret and not a.rs256:
        a.secret = workspace_secret(a.workspace, create=False)
    if not a.secret:
        ap.error(f"no secret: pass --secret, set BIG_JWT_SECRET, or start BIG once to make {a.workspace}/{SECRET_FILE}")
    key = open(a.secret).read() if a.rs256 else a.secret
    print(mint_token(a.user_id, key, days=a.days, algorithm="RS256" if a.rs256 else "HS256",
                     audience=a.audience, issuer=a.issuer, admin=a.admin))


if __name__ == "__main__":
    main()
