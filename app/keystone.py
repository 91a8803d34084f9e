"""Keystone mode (SPEC 11): callers' tokens validated against Keystone, asynchronously, and cached.

The service's own token comes from keystoneauth1 (password auth, the library every OpenStack client uses);
its blocking refresh runs in a thread of its own, only when the token is missing or about to expire.
Callers' tokens are validated with one `GET /v3/auth/tokens` on an httpx AsyncClient, so a validation never
holds a thread or blocks the loop. Tokens are opaque (Fernet): only Keystone's answer is read, never a token.

A validated token is believed until min(TETHER_KEYSTONE_TOKEN_CACHE_TIME, its expiry); a token Keystone
refused is remembered for a few seconds, so a client retrying a bad token does not become a Keystone
load. Concurrent requests with the same unknown token share one validation. When Keystone cannot answer,
the request is a 503: never a 500, never let through.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
from keystoneauth1 import exceptions as ksa_exceptions
from keystoneauth1 import session as ksa_session
from keystoneauth1.identity import generic

from app.auth import Context, check_path_project
from app.config import Settings
from app.errors import ServiceUnavailable, Unauthorized

log = logging.getLogger("tether.keystone")

# refused tokens are remembered this long (at most the cache time)
INVALID_CACHE_SECONDS = 10.0
# tokens remembered at once (valid and invalid); the oldest go first
TOKENS_KEPT = 20000
# a Fernet token is ~200 characters; anything far longer is refused without asking Keystone
MAX_TOKEN_LENGTH = 8192
# keystoneauth's own margin: a service token this close to its expiry is renewed first
SERVICE_TOKEN_MARGIN = 120
UNAVAILABLE = "The identity service is unavailable; try again later."


@dataclass(frozen=True)
class Token:
    """What Keystone said about a token."""

    user_id: str
    project_id: str | None
    roles: frozenset[str]
    is_admin_project: bool
    expires_at: datetime


class _Refused(Exception):
    """Keystone says the token is not valid (unknown, expired, revoked, malformed)."""


def _identity_url(auth_url: str) -> str:
    """The v3 Identity API under the auth URL (`http://ks:5000`, `…/v3`, devstack's `…/identity`)."""
    base = auth_url.rstrip("/")
    return base if base.endswith("/v3") else f"{base}/v3"


def _parse(body: Any) -> Token:
    """Keystone's validation answer (`{"token": {…}}`) as a Token; anything else is Keystone misbehaving."""
    token = body["token"]
    project = token.get("project")
    expires_at = datetime.fromisoformat(token["expires_at"])
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return Token(
        user_id=str(token["user"]["id"]),
        project_id=str(project["id"]) if project else None,
        roles=frozenset(str(role["name"]) for role in token.get("roles", [])),
        is_admin_project=bool(token.get("is_admin_project", True)),
        expires_at=expires_at,
    )


class TokenValidator:
    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # Settings refuses keystone mode without them
        assert settings.keystone_auth_url
        assert settings.keystone_username
        assert settings.keystone_password
        self.www_authenticate = settings.keystone_www_authenticate_uri or settings.keystone_auth_url
        self.service_token_roles = settings.service_token_role_set
        self._cache_time = float(settings.keystone_token_cache_time)
        self._tokens_url = f"{_identity_url(settings.keystone_auth_url)}/auth/tokens"
        timeout = settings.keystone_http_connect_timeout
        self._plugin = generic.Password(
            auth_url=settings.keystone_auth_url,
            username=settings.keystone_username,
            password=settings.keystone_password.get_secret_value(),
            project_name=settings.keystone_project_name,
            user_domain_name=settings.keystone_user_domain_name,
            project_domain_name=settings.keystone_project_domain_name,
        )
        self._session = ksa_session.Session(auth=self._plugin, timeout=timeout)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)
        # one refresh of the service token at a time, in a thread of its own (keystoneauth is blocking)
        self._service_lock = asyncio.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._cache: OrderedDict[str, tuple[float, Token | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Token]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()
        self._session.session.close()

    def unauthorized(self, message: str) -> Unauthorized:
        return Unauthorized(message, www_authenticate=self.www_authenticate)

    # -- the service's own token --------------------------------------------------------------------

    def _fresh_service_token(self) -> str | None:
        ref = self._plugin.auth_ref
        if ref is None or ref.will_expire_soon(stale_duration=SERVICE_TOKEN_MARGIN):
            return None
        return str(ref.auth_token)

    async def _service_token(self, *, renew: bool = False) -> str:
        token = None if renew else self._fresh_service_token()
        if token is not None:
            return token
        async with self._service_lock:
            if renew:
                self._plugin.invalidate()
            token = self._fresh_service_token()
            if token is None:
                try:
                    token = await anyio.to_thread.run_sync(self._plugin.get_token, self._session, limiter=self._limiter)
                except ksa_exceptions.ClientException as error:
                    log.error("cannot get Tether's own token from Keystone: %s", error)
                    raise ServiceUnavailable(UNAVAILABLE) from None
            if not token:
                raise ServiceUnavailable(UNAVAILABLE)
            return str(token)

    # -- callers' tokens ------------------------------------------------------------------------------

    async def validate(self, token: str) -> Token:
        """The token's user, project and roles; 401 when Keystone refuses it, 503 when Keystone cannot say."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            raise self.unauthorized("The request you have made requires authentication.")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None:
            deadline, known = cached
            if now < deadline:
                if known is None:
                    raise self.unauthorized("The request you have made requires authentication.")
                return known
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is None:
            # a task of its own: a caller that goes away does not cancel the validation others wait for
            pending = asyncio.ensure_future(self._ask(key, token))
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        try:
            return await asyncio.shield(pending)
        except _Refused:
            raise self.unauthorized("The request you have made requires authentication.") from None

    def _settled(self, key: str, done: asyncio.Future[Token]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    def _remember(self, key: str, seconds: float, token: Token | None) -> None:
        if seconds <= 0:
            return
        self._cache[key] = (time.monotonic() + seconds, token)
        if len(self._cache) > TOKENS_KEPT:
            self._cache.popitem(last=False)

    async def _ask(self, key: str, token: str) -> Token:
        answer = await self._validation(token)
        if answer is None:
            self._remember(key, min(INVALID_CACHE_SECONDS, self._cache_time), None)
            raise _Refused
        left = (answer.expires_at - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise _Refused  # Keystone would not say so, but a clock is a clock
        self._remember(key, min(self._cache_time, left), answer)
        return answer

    async def _validation(self, token: str) -> Token | None:
        """One validation (and one retry with a renewed service token); None: Keystone refused the token."""
        for attempt in range(2):
            service_token = await self._service_token(renew=attempt > 0)
            try:
                response = await self._http.get(
                    self._tokens_url,
                    params={"nocatalog": "1"},
                    headers={"X-Auth-Token": service_token, "X-Subject-Token": token, "Accept": "application/json"},
                )
            except httpx.HTTPError as error:
                log.error("Keystone did not answer a token validation: %s", error.__class__.__name__)
                raise ServiceUnavailable(UNAVAILABLE) from None
            if response.status_code == 200:
                try:
                    return _parse(response.json())
                except (ValueError, KeyError, TypeError):
                    log.error("Keystone's token validation answer is not a token")
                    raise ServiceUnavailable(UNAVAILABLE) from None
            if response.status_code in (400, 404):
                return None
            if response.status_code == 401 and attempt == 0:
                continue  # our own token expired or was revoked early: renew it once
            log.error(
                "Keystone answered %d to a token validation: is TETHER_KEYSTONE_USERNAME allowed to validate "
                "tokens (the service role)?",
                response.status_code,
            )
            raise ServiceUnavailable(UNAVAILABLE)
        raise ServiceUnavailable(UNAVAILABLE)

    # -- the caller -----------------------------------------------------------------------------------

    async def context(self, headers: Mapping[str, str], path_project: str | None) -> Context:
        """The caller from X-Auth-Token (and Nova's X-Service-Token); every other identity header is ignored."""
        token = headers.get("x-auth-token")
        if not token:
            raise self.unauthorized("Authentication required: send a Keystone token in X-Auth-Token.")
        user = await self.validate(token)
        if user.project_id is None:
            raise self.unauthorized("The token is not scoped to a project: ask Keystone for a project-scoped token.")
        service_roles: frozenset[str] = frozenset()
        service_token = headers.get("x-service-token")
        if service_token:
            service = await self.validate(service_token)
            # keystonemiddleware's service_token_roles_required: a service token without a service role is
            # a user's token passed off as a service's
            if not service.roles & self.service_token_roles:
                raise self.unauthorized("The service token has none of the service roles.")
            service_roles = service.roles
        check_path_project(user.project_id, path_project)
        return Context(
            user_id=user.user_id,
            project_id=user.project_id,
            roles=user.roles,
            service_roles=service_roles,
            is_admin_project=user.is_admin_project,
            guards_in_use=not service_roles & self.service_token_roles,
        )
