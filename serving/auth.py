"""Who may call what: the admin token for /admin, the API keys for /v1, and who may label an
exchange (feedback becomes training data, so it is not open where inference is not).

Secrets are compared as bytes, in constant time, against every configured one. An exchange
keeps the id of the API key that made it (`key_id`: the first 16 hex of its SHA-256, never
the key), and that key may post its feedback; a feedback key (`gateway.feedback_keys`, for a
labelling team or a replay tool) may post feedback for any exchange, and opens nothing else.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from serving.protocol import OpenAIError


def key_id(key: str) -> str:
    """The id an exchange keeps of the API key that made it: it tells keys apart and cannot
    be turned back into the key (keys are random secrets, too long to guess from it)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FeedbackCaller:
    """Who posts feedback: `made_by` is the API key id the exchange must have been made with
    (None: a feedback key, or an open gateway, labels any exchange); `bucket` is whose rate
    limit the post spends."""

    made_by: str | None
    bucket: str


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _accepted(token: str | None, secrets_: list[bytes]) -> bool:
    """Whether `token` is one of `secrets_`, in time that does not depend on where they differ.

    Bytes, not str: `compare_digest` refuses non-ASCII str (a 500); every secret is compared,
    so the time does not tell which one came close either. An empty token never passes."""
    if not token:
        return False
    given = token.encode()
    return sum(secrets.compare_digest(given, secret) for secret in secrets_) > 0


def _invalid_api_key() -> OpenAIError:
    return OpenAIError(
        401, "Missing or invalid API key.", type="authentication_error", code="invalid_api_key"
    )


class Auth:
    """The app's checks (the admin one a FastAPI dependency, the others called by the routes
    before they read a body); the secrets encoded once, not per request."""

    def __init__(self, admin_token: str, api_keys: list[str], feedback_keys: list[str]) -> None:
        self._admin = [admin_token.encode()]
        self._api_keys = [key.encode() for key in api_keys]
        self._feedback_keys = [key.encode() for key in feedback_keys]

    # async: no I/O here, and a sync dependency would cost a worker-thread hop per request.
    async def admin(self, request: Request) -> None:
        if not _accepted(_bearer(request), self._admin):
            raise OpenAIError(
                401,
                "Admin API needs 'Authorization: Bearer <admin token>'.",
                type="authentication_error",
                code="invalid_admin_token",
            )

    def api_key(self, request: Request) -> str | None:
        """The id of the request's API key; None where /v1 is open (no API keys configured)."""
        if not self._api_keys:
            return None
        token = _bearer(request)
        if not _accepted(token, self._api_keys):
            raise _invalid_api_key()
        assert token is not None
        return key_id(token)

    def feedback(self, request: Request) -> FeedbackCaller:
        """Open only while neither API keys nor feedback keys are configured; then a feedback
        key labels any exchange and an API key the exchanges it made."""
        token = _bearer(request)
        if not self._api_keys and not self._feedback_keys:
            return FeedbackCaller(None, f"client:{request.client.host if request.client else ''}")
        if _accepted(token, self._feedback_keys):
            assert token is not None
            return FeedbackCaller(None, f"feedback-key:{key_id(token)}")
        if _accepted(token, self._api_keys):
            assert token is not None
            return FeedbackCaller(key_id(token), f"api-key:{key_id(token)}")
        raise _invalid_api_key()
