"""Strict stand-ins for the seed systems (``shared/seeds``, PROVIDERS.md §3).

Each server answers a request of the exact shape its seed document
describes the way that system does, and refuses anything else with the
error the system gives (or a plain 4xx where the document says nothing), so
a test that passes against it proves the request shape. Every request is
recorded (:class:`Exchange`), and every spendable token presented is
counted in ``uses``: a rotating system's token must show a count of 1.

- :class:`WorkatoServer`: ``PUT /api/api_access_profiles/{id}/refresh_secret``,
  ``Authorization: Bearer <current token>``, no body (seed 000).
- :class:`CspServer`: VMware CSP ``api-tokens/authorize``, anonymous form
  post of ``api_token`` (+ MFA ``passcode``) (seed 001).
- :class:`WebMethodsServer`: ``pub.oauth:refreshAccessToken``, Basic only,
  scope a subset of the original, ``expires_in`` as a string (seed 002).
- :class:`SmartThingsServer`: form only (JSON gets 401), Basic plus
  ``client_id`` in the body, single-use rotating refresh tokens (seed 003).
- :class:`ClientCredentialsServer`: ``grant_type=client_credentials``.

``script()`` makes the next well-formed request get a canned answer instead
(nothing is consumed), for failure mapping and error-rule tests.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

__all__ = [
    "FORM",
    "AccessProfile",
    "ApiToken",
    "ClientCredentialsServer",
    "CspServer",
    "Exchange",
    "Grant",
    "Reply",
    "SeedServer",
    "SmartThingsServer",
    "WebMethodsServer",
    "WorkatoServer",
]

FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


def new_token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(12)}"


@dataclass(slots=True)
class Exchange:
    """One request as the server saw it, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    content_type: str  # "" when the request had no Content-Type header
    body: dict[str, str] | None  # form or JSON object of strings; {} if empty; None if neither
    raw: bytes
    at: float  # time.monotonic() on arrival
    status: int = 0
    note: str = ""  # why the answer is not a success ("" for a 2xx)
    shape_error: bool = False  # refused because the request is not of the system's shape
    reply: dict[str, Any] = field(default_factory=dict)  # the JSON document answered

    @property
    def authorization(self) -> str:
        return self.headers.get("authorization", "")

    def basic(self) -> tuple[str, str] | None:
        """Basic credentials, form-decoded as RFC 6749 §2.3.1 asks."""
        scheme, _, value = self.authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            pair = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = pair.partition(":")
        return (unquote_plus(user), unquote_plus(password)) if sep else None

    def bearer(self) -> str | None:
        scheme, _, value = self.authorization.partition(" ")
        return value if scheme == "Bearer" and value else None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    doc: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""
    shape_error: bool = False


class Refused(Exception):
    """Raised by a handler to answer with ``reply`` (a refusal)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.note)
        self.reply = reply


def _parse_body(content_type: str, raw: bytes) -> dict[str, str] | None:
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if content_type == FORM:
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            return None
        form = dict(pairs)
        return form if len(form) == len(pairs) else None  # a parameter sent twice
    if content_type == JSON_TYPE:
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        if isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values()):
            return doc
    return None


class SeedServer:
    """An aiohttp server on 127.0.0.1 that records every exchange."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.uses: Counter[str] = Counter()
        self._scripted: deque[Reply] = deque()
        self._runner: web.ServerRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> Self:
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ for tests

    def script(
        self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        """The next well-formed request gets this answer; nothing is consumed."""
        self._scripted.append(Reply(status, doc, headers or {}, note=f"scripted {status}"))

    @property
    def shape_errors(self) -> list[str]:
        return [e.note for e in self.exchanges if e.shape_error]

    def answered(self, status: int) -> list[Exchange]:
        return [e for e in self.exchanges if e.status == status]

    # ------------------------------------------------------- for subclasses

    def answer(self, req: Exchange) -> Reply:
        raise NotImplementedError

    def error_doc(self, status: int, note: str) -> dict[str, Any]:
        return {"error": "invalid_request", "error_description": note}

    def refuse(self, status: int, note: str, doc: dict[str, Any] | None = None) -> Refused:
        """The request is not of this system's shape."""
        return Refused(
            Reply(status, doc or self.error_doc(status, note), note=note, shape_error=True)
        )

    def fail(
        self,
        status: int,
        note: str,
        doc: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Refused:
        """A well-formed request the system refuses (dead token, bad scope)."""
        return Refused(Reply(status, doc or self.error_doc(status, note), headers or {}, note))

    def scripted(self) -> Reply | None:
        return self._scripted.popleft() if self._scripted else None

    def oauth_error(self, code: str, note: str) -> dict[str, Any]:
        return {"error": code, "error_description": note}

    def form_of(self, req: Exchange, *, status: int = 400) -> dict[str, str]:
        if req.content_type != FORM:
            raise self.refuse(status, f"Content-Type must be {FORM}, got {req.content_type!r}")
        if req.body is None:
            raise self.refuse(400, "body is not a well-formed form (or repeats a parameter)")
        if req.query:
            raise self.refuse(400, f"unexpected query parameters {sorted(req.query)}")
        return req.body

    # ------------------------------------------------------------- plumbing

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        content_type = request.content_type if "content-type" in headers else ""
        req = Exchange(
            method=request.method,
            path=request.path,
            query=dict(parse_qsl(request.query_string, keep_blank_values=True)),
            headers=headers,
            content_type=content_type,
            body=_parse_body(content_type, raw),
            raw=raw,
            at=time.monotonic(),
        )
        try:
            reply = self.answer(req)
        except Refused as refused:
            reply = refused.reply
        req.status, req.note, req.shape_error = reply.status, reply.note, reply.shape_error
        req.reply = reply.doc
        self.exchanges.append(req)
        return web.Response(
            status=reply.status,
            text=json.dumps(reply.doc),
            content_type=JSON_TYPE,
            headers=reply.headers,
        )


# --------------------------------------------------------------- seed 000


@dataclass(slots=True)
class AccessProfile:
    id: int
    name: str
    auth_type: str  # token | oauth2 | jwt | oidc
    token: str  # what Authorization: Bearer must carry now
    oauth_client_id: str = ""
    rotations: int = 0


class WorkatoServer(SeedServer):
    """Workato ``refresh_secret``: the old token dies the moment a new one is
    issued; JWT profiles cannot be refreshed (400)."""

    _PATH = re.compile(r"/api/api_access_profiles/([^/]+)/refresh_secret")

    def __init__(self) -> None:
        super().__init__()
        self.profiles: dict[int, AccessProfile] = {}
        self.dead: set[str] = set()

    @staticmethod
    def url_at(base_url: str) -> str:
        """The token URL, with the access-profile id as a placeholder."""
        return f"{base_url}/api/api_access_profiles/{{api_access_profile_id}}/refresh_secret"

    @property
    def token_url(self) -> str:
        return self.url_at(self.base_url)

    def add_profile(self, auth_type: str = "token") -> AccessProfile:
        pid = 17 + len(self.profiles)
        profile = AccessProfile(
            id=pid,
            name=f"Profile {pid}",
            auth_type=auth_type,
            token=new_token(f"wk{pid}"),
            oauth_client_id=new_token("wkcid") if auth_type == "oauth2" else "",
        )
        self.profiles[pid] = profile
        return profile

    def error_doc(self, status: int, note: str) -> dict[str, Any]:
        return {"message": note}

    def answer(self, req: Exchange) -> Reply:
        match = self._PATH.fullmatch(req.path)
        if match is None:
            raise self.refuse(404, "Not found")
        if req.method != "PUT":
            raise self.refuse(405, f"{req.method} not allowed: refresh_secret is PUT")
        if req.raw or req.query:
            raise self.refuse(400, "refresh_secret takes no body and no query parameters")
        bearer = req.bearer()
        if bearer is None:
            raise self.refuse(401, "Authorization: Bearer <token> required")
        self.uses[bearer] += 1
        raw_id = match.group(1)
        profile = self.profiles.get(int(raw_id)) if raw_id.isdigit() else None
        if profile is None:
            raise self.fail(404, "Access profile not found")
        if bearer != profile.token:
            raise self.fail(401, "Unauthorized")
        canned = self.scripted()
        if canned is not None:
            return canned
        if profile.auth_type == "jwt":
            raise self.fail(400, "Refreshing the secret is not supported for JWT access profiles")
        self.dead.add(profile.token)
        profile.rotations += 1
        profile.token = new_token(f"wk{profile.id}")
        doc: dict[str, Any] = {
            "id": profile.id,
            "name": profile.name,
            "api_client_id": 5,
            "api_collection_ids": [1, 2],
            "active": True,
            "auth_type": profile.auth_type,
            "ip_allow_list": [],
            "created_at": "2024-01-15T11:50:32.986-07:00",
            "updated_at": "2024-01-15T11:50:32.986-07:00",
        }
        if profile.auth_type == "oauth2":
            profile.oauth_client_id = new_token("wkcid")
            doc |= {
                "oauth_client_id": profile.oauth_client_id,
                "oauth_client_secret": profile.token,
            }
        else:
            doc["secret"] = profile.token
        return Reply(200, doc)


# --------------------------------------------------------------- seed 001


@dataclass(slots=True)
class ApiToken:
    value: str
    passcode: str = ""  # MFA: the passcode a request must carry ("" = no MFA)
    expired: bool = False


class CspServer(SeedServer):
    """VMware CSP ``api-tokens/authorize``: anonymous, form field
    ``api_token``; the API token is reusable until its own TTL."""

    PATH = "/csp/gateway/am/api/auth/api-tokens/authorize"

    def __init__(self, *, accept_deprecated_name: bool = False, lifetime_s: int = 1799) -> None:
        super().__init__()
        self.accept_deprecated_name = accept_deprecated_name
        self.lifetime_s = lifetime_s
        self.tokens: dict[str, ApiToken] = {}
        self.issued: list[str] = []

    @property
    def token_url(self) -> str:
        return self.base_url + self.PATH

    def add_token(self, *, passcode: str = "") -> ApiToken:
        token = ApiToken(new_token("csp-api"), passcode=passcode)
        self.tokens[token.value] = token
        return token

    def fail_next(self, status: int, *, retry_after: int | None = None) -> None:
        messages = {
            400: "Invalid request body | In case of expired refresh_token.",
            404: "The requested resource could not be found",
            409: "The request could not be processed due to a conflict",
            429: "The user has sent too many requests",
            500: "An unexpected error has occurred while processing the request",
        }
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self.script(status, self.error_doc(status, messages[status]), headers)

    def error_doc(self, status: int, note: str) -> dict[str, Any]:
        return {
            "cspErrorCode": f"540.{status}.1",
            "errorCode": f"{status}.1",
            "message": note,
            "moduleCode": 540,
            "requestId": uuid.uuid4().hex,
            "statusCode": status,
        }

    def answer(self, req: Exchange) -> Reply:
        if req.path != self.PATH:
            raise self.refuse(404, "The requested resource could not be found")
        if req.method != "POST":
            raise self.refuse(405, f"{req.method} not allowed")
        if "authorization" in req.headers:
            raise self.refuse(400, "anonymous endpoint: no Authorization header expected")
        if req.query:
            raise self.refuse(400, "the token in the query string is deprecated")
        form = self.form_of(req, status=415)
        allowed = {"api_token", "passcode"} | (
            {"refresh_token"} if self.accept_deprecated_name else set()
        )
        if set(form) - allowed:
            raise self.refuse(400, f"Invalid request body: {sorted(set(form) - allowed)}")
        names = [n for n in ("api_token", "refresh_token") if n in form]
        if len(names) != 1:
            raise self.refuse(400, "Invalid request body: exactly one api_token")
        value = form[names[0]]
        self.uses[value] += 1
        canned = self.scripted()
        if canned is not None:
            return canned
        token = self.tokens.get(value)
        if token is None or token.expired:
            raise self.fail(400, "Invalid request body | In case of expired refresh_token.")
        if token.passcode and form.get("passcode") != token.passcode:
            raise self.fail(400, "Invalid multi-factor authentication passcode")
        access = new_token("csp-at")
        self.issued.append(access)
        return Reply(
            200,
            {
                "access_token": access,
                "expires_in": self.lifetime_s,
                "id_token": new_token("csp-id"),
                "refresh_token": token.value,
                "scope": "openid group_names",
                "token_type": "bearer",
            },
        )


# ------------------------------------------------------- seeds 002 and 003


@dataclass(slots=True)
class Grant:
    refresh_token: str
    access_token: str
    original_scope: str
    scope: str
    expired: bool = False
    refreshes: int = 0
    installed_app_id: str = ""
    history: list[str] = field(default_factory=list)  # every refresh token it held


class _RotatingServer(SeedServer):
    """Grants whose refresh token is replaced on every use."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.grants: dict[str, Grant] = {}  # by current refresh token
        self.spent: set[str] = set()

    def issue_grant(self, scope: str) -> Grant:
        rt = new_token("rt")
        grant = Grant(rt, new_token("at"), scope, scope, installed_app_id=str(uuid.uuid4()))
        grant.history.append(rt)
        self.grants[rt] = grant
        return grant

    def rotate(self, grant: Grant) -> None:
        del self.grants[grant.refresh_token]
        self.spent.add(grant.refresh_token)
        grant.refresh_token, grant.access_token = new_token("rt"), new_token("at")
        grant.history.append(grant.refresh_token)
        grant.refreshes += 1
        self.grants[grant.refresh_token] = grant

    def client_ok(self, req: Exchange) -> bool:
        return req.basic() == (self.client_id, self.client_secret)


class WebMethodsServer(_RotatingServer):
    """Integration Server ``pub.oauth:refreshAccessToken``."""

    PATH = "/invoke/pub.oauth/refreshAccessToken"

    def __init__(self, client_id: str = "wm-client", client_secret: str = "wm-secret") -> None:  # noqa: S107
        super().__init__(client_id, client_secret)
        self.lifetime = "3600"  # typed String by the service

    @property
    def token_url(self) -> str:
        return self.base_url + self.PATH

    def answer(self, req: Exchange) -> Reply:
        if req.path != self.PATH:
            raise self.refuse(404, "service not found")
        if req.method != "POST":
            raise self.refuse(405, f"{req.method}: watt.server.oauth.requirePost is true")
        form = self.form_of(req)
        if "client_secret" in form or "client_id" in form:
            raise self.refuse(
                401,
                "confidential clients authenticate in the Authorization header only",
                self.oauth_error("invalid_client", "header only"),
            )
        if not self.client_ok(req):
            raise self.refuse(
                401, "bad client credentials", self.oauth_error("invalid_client", "bad client")
            )
        unknown = set(form) - {"grant_type", "refresh_token", "scope"}
        if unknown:
            raise self.refuse(400, f"unknown parameter(s) {sorted(unknown)}")
        if form.get("grant_type") != "refresh_token":
            raise self.refuse(
                400,
                "grant_type must be refresh_token",
                self.oauth_error("unsupported_grant_type", "grant_type"),
            )
        rt = form.get("refresh_token", "")
        if not rt:
            raise self.refuse(400, "refresh_token missing")
        self.uses[rt] += 1
        canned = self.scripted()
        if canned is not None:
            return canned
        grant = self.grants.get(rt)
        if grant is None:
            raise self.fail(
                400,
                "unknown or spent refresh token",
                self.oauth_error("invalid_grant", "invalid refresh token"),
            )
        if "scope" in form:
            if not set(form["scope"].split()) <= set(grant.original_scope.split()):
                raise self.fail(
                    400,
                    "scope wider than the original request",
                    self.oauth_error("invalid_scope", "scope"),
                )
            grant.scope = form["scope"]
        self.rotate(grant)
        return Reply(
            200,
            {
                "access_token": grant.access_token,
                "token_type": "Bearer",
                "expires_in": self.lifetime,
                "refresh_token": grant.refresh_token,
                "scope": grant.scope,
            },
        )


class SmartThingsServer(_RotatingServer):
    """SmartThings ``/v1/oauth/token``: a used or expired refresh token gets 401."""

    PATH = "/v1/oauth/token"
    _UNAUTHORIZED: ClassVar[dict[str, Any]] = {
        "error": "unauthorized",
        "error_description": "Full authentication is required to access this resource",
    }

    def __init__(self, client_id: str = "st-client", client_secret: str = "st-secret") -> None:  # noqa: S107
        super().__init__(client_id, client_secret)
        self.lifetime_s = 86399
        self.owner_account_id = str(uuid.uuid4())

    @property
    def token_url(self) -> str:
        return self.base_url + self.PATH

    def answer(self, req: Exchange) -> Reply:
        if req.path != self.PATH:
            raise self.refuse(404, "not found")
        if req.method != "POST":
            raise self.refuse(405, f"{req.method} not allowed")
        if req.content_type != FORM:  # what the seed's user saw for JSON
            raise self.refuse(401, f"{req.content_type or 'no'} body: 401", self._UNAUTHORIZED)
        form = self.form_of(req)
        if not self.client_ok(req):
            raise self.refuse(401, "Basic client_id:client_secret required", self._UNAUTHORIZED)
        if form.get("client_id") != self.client_id:
            raise self.refuse(401, "client_id missing from the body", self._UNAUTHORIZED)
        unknown = set(form) - {"grant_type", "refresh_token", "client_id", "redirect_uri"}
        if unknown:
            raise self.refuse(400, f"unexpected parameter(s) {sorted(unknown)}")
        if form.get("grant_type") != "refresh_token" or not form.get("refresh_token"):
            raise self.refuse(400, "grant_type=refresh_token and refresh_token required")
        rt = form["refresh_token"]
        self.uses[rt] += 1
        canned = self.scripted()
        if canned is not None:
            return canned
        grant = self.grants.get(rt)
        if grant is None:
            raise self.fail(
                401,
                "used or unknown refresh token",
                self.oauth_error("invalid_token", "Invalid refresh token"),
            )
        if grant.expired:
            raise self.fail(
                401,
                "expired refresh token",
                self.oauth_error("invalid_token", "Invalid refresh token (expired)"),
            )
        self.rotate(grant)
        return Reply(
            200,
            {
                "access_token": grant.access_token,
                "token_type": "bearer",
                "refresh_token": grant.refresh_token,
                "expires_in": self.lifetime_s,
                "scope": grant.scope,
                "access_tier": 0,
                "installed_app_id": grant.installed_app_id,
                "owner_account_id": self.owner_account_id,
                "developer_account_id": "dev-1",
                "iot_account_id": "iot-1",
            },
        )


# ------------------------------------------------------ client_credentials


class ClientCredentialsServer(SeedServer):
    """RFC 6749 §4.4: client authentication and an optional scope; no
    refresh token is accepted or issued."""

    PATH = "/oauth2/token"

    def __init__(
        self,
        client_id: str = "cc-client",
        client_secret: str = "cc-secret",  # noqa: S107
        *,
        allowed_scope: str = "read write",
        lifetime_s: int = 3600,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.allowed_scope = allowed_scope
        self.lifetime_s = lifetime_s
        self.issued: list[str] = []

    @property
    def token_url(self) -> str:
        return self.base_url + self.PATH

    def answer(self, req: Exchange) -> Reply:
        if req.path != self.PATH:
            raise self.refuse(404, "not found")
        if req.method != "POST":
            raise self.refuse(405, f"{req.method} not allowed")
        form = self.form_of(req)
        in_body = "client_id" in form or "client_secret" in form
        if in_body == (req.basic() is not None):
            raise self.refuse(
                401,
                "exactly one client authentication method",
                self.oauth_error("invalid_client", "client auth"),
            )
        pair = (form.get("client_id"), form.get("client_secret")) if in_body else req.basic()
        if pair != (self.client_id, self.client_secret):
            raise self.refuse(
                401, "bad client credentials", self.oauth_error("invalid_client", "bad client")
            )
        unknown = set(form) - {"grant_type", "scope", "client_id", "client_secret"}
        if unknown:
            raise self.refuse(400, f"unexpected parameter(s) {sorted(unknown)}")
        if form.get("grant_type") != "client_credentials":
            raise self.refuse(
                400,
                "grant_type must be client_credentials",
                self.oauth_error("unsupported_grant_type", "grant_type"),
            )
        self.uses[self.client_id] += 1
        canned = self.scripted()
        if canned is not None:
            return canned
        scope = form.get("scope", self.allowed_scope)
        if not set(scope.split()) <= set(self.allowed_scope.split()):
            raise self.fail(400, "scope not allowed", self.oauth_error("invalid_scope", "scope"))
        access = new_token("cc-at")
        self.issued.append(access)
        return Reply(
            200,
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.lifetime_s,
                "scope": scope,
            },
        )
