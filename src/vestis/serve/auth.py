"""Bearer-token access: writes always need the token; reads need it in private mode."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

MIN_TOKEN_LENGTH = 16


def read_token(path: str | Path) -> str:
    """The token in a file (surrounding whitespace ignored); refuses a short or empty one."""
    path = Path(path).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ValueError(
            f"{path}: the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


_bearer = HTTPBearer(auto_error=False, description="The token from the server's --token-file.")


def token_checker(token: str | None, *, what: str) -> Callable[..., None]:
    """A dependency that admits requests bearing ``token``; ``what`` names them in errors."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if token is None:
            raise HTTPException(
                403, f"{what} are disabled: start vestis serve with --token-file to allow them"
            )
        if credentials is None:
            raise HTTPException(
                401,
                f"{what} need a bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(403, "invalid token")

    return check


def open_access() -> None:
    """Reads in public mode: anyone may search."""
