"""Strict stand-ins for the seed systems (``shared/seeds``, PROVIDERS.md §3).

Each server answers a request of the exact shape its seed document
describes the way that system does, and refuses anything else with the
error the system gives (or a plain 4xx where the document says nothing), so
a test that passes against it proves the request shape. Every request is
recorded (:class:`Exchange`), and every spendable token presented is
counted in ``uses``: a rotating system's token must show a count of 1.

- :class:`WorkatoServer`: ``PUT /api/api_access_profiles/{id}/refresh_secret``
  (seed 000, deprecated) and the v2 API-key forms (``/api/v2/api_clients/...``,
  ``/api/v2/managed_users/{id}/api_clients/...``, answer under ``data``),
  ``Authorization: Bearer <developer API token>``, no body; the rotated
  secret is the output (PROVIDERS.md §3.2).
- :class:`CspServer`: VMware CSP ``api-tokens/authorize``, anonymous form
  post of ``api_token`` (+ MFA ``passcode``) (seed 001).
- :class:`WebMethodsServer`: ``pub.oauth:refreshAccessToken``, Basic only,
  scope a subset of the original, ``expires_in`` as a string (seed 002).
- :class:`SmartThingsServer`: form only (JSON gets 401), Basic plus
  ``client_id`` in the body, single-use rotating refresh tokens (seed 003).
- :class:`ClientCredentialsServer`: ``grant_type=client_credentials``.

``script()`` makes the next well-formed request get a canned answer instead
(nothing is consumed), for failure mapping and error-rule tests; a
:class:`Reply` with ``lost=True`` resets the connection instead of answering.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import socket
import struct
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, unquote, unquote_plus

from aiohttp import web

__all__ = [
    "FORM",
    "AccessProfile",
    "ApiToken",
    "ClientCredentialsServer",
    "CspServer",
    "Exchange",
    "Grant",
    "ManagedUser",
    "Reply",
    "SeedServer",
    "SmartThingsServer",
    "WebMethodsServer",
    "WorkatoServer",
]

FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST, not FIN


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
    raw_path: str = ""  # the path as sent, percent-encoding kept
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
    lost: bool = False  # the connection is reset instead: the answer never arrives


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
        self._lose_next = False
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

    def lose_next_answer(self) -> None:
        """The next successful request does its work (rotates, spends) and
        its answer is lost: the connection is reset instead."""
        self._lose_next = True

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
            raw_path=request.raw_path.partition("?")[0],
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
        if self._lose_next and 200 <= reply.status < 300:
            self._lose_next = False
            reply = Reply(reply.status, reply.doc, reply.headers, "answer lost", lost=True)
        req.status, req.note, req.shape_error = reply.status, reply.note, reply.shape_error
        req.reply = reply.doc
        self.exchanges.append(req)
        if reply.lost:
            return _reset(request)
        return web.Response(
            status=reply.status,
            text=json.dumps(reply.doc),
            content_type=JSON_TYPE,
            headers=reply.headers,
        )


def _reset(request: web.BaseRequest) -> web.Response:
    """Reset the connection without answering (the client sees the request
    sent and no answer); aiohttp then fails to write the returned response."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    return web.Response(status=500)


# --------------------------------------------------------------- seed 000


@dataclass(slots=True)
class AccessProfile:
    """An access profile (v1) or API key (v2): the same object in Workato."""

    id: int
    name: str
    auth_type: str  # token | oauth2 | jwt | oidc
    token: str  # the live secret: what API-platform clients must present now
    oauth_client_id: str = ""
    api_client_id: int = 5
    managed_user: str | None = None  # an embedded customer's id; None: the workspace's own
    rotations: int = 0
    issued: list[str] = field(default_factory=list)  # every secret it held, oldest first


@dataclass(frozen=True, slots=True)
class ManagedUser:
    """An embedded-partner customer: addressed by id or by ``E<external id>``."""

    id: str
    external_id: str


class WorkatoServer(SeedServer):
    """Workato's secret rotation (PROVIDERS.md §3.2). Every call is
    authorized by the workspace's developer API token (``api_token``),
    which rotation never consumes; the access profile's secret is the
    output, and the previous one dies at once. JWT profiles cannot be
    refreshed (400). A bearer that is an access-profile secret (the old,
    wrong semantics) is a shape error."""

    _V1 = re.compile(r"/api/api_access_profiles/([^/]+)/refresh_secret")
    _V2 = re.compile(
        r"/api/v2/(?:managed_users/([^/]+)/)?api_clients/([^/]+)/api_keys/([^/]+)/refresh_secret"
    )
    _V1_PATH = "/api/api_access_profiles/{api_access_profile_id}/refresh_secret"
    _V2_PATH = "/api/v2/api_clients/{api_client_id}/api_keys/{api_key_id}/refresh_secret"

    def __init__(self) -> None:
        super().__init__()
        self.api_token = new_token("wkdev")  # the developer API client token
        self.profiles: dict[int, AccessProfile] = {}
        self.managed_users: list[ManagedUser] = []
        self.dead: set[str] = set()

    @classmethod
    def url_at(cls, base_url: str) -> str:
        """The v1 token URL, with the access-profile id as a placeholder."""
        return base_url + cls._V1_PATH

    @property
    def token_url(self) -> str:
        return self.url_at(self.base_url)

    @property
    def api_key_url(self) -> str:
        return self.base_url + self._V2_PATH

    @property
    def embedded_url(self) -> str:
        return f"{self.base_url}/api/v2/managed_users/{{managed_user_id}}" + self._V2_PATH[7:]

    def add_profile(
        self, auth_type: str = "token", *, managed_user: ManagedUser | None = None
    ) -> AccessProfile:
        pid = 17 + len(self.profiles)
        profile = AccessProfile(
            id=pid,
            name=f"Profile {pid}",
            auth_type=auth_type,
            token=new_token(f"wk{pid}"),
            oauth_client_id=new_token("wkcid") if auth_type == "oauth2" else "",
            api_client_id=5 if managed_user is None else 50 + len(self.managed_users),
            managed_user=None if managed_user is None else managed_user.id,
        )
        profile.issued.append(profile.token)
        self.profiles[pid] = profile
        return profile

    def add_managed_user(self, external_id: str) -> ManagedUser:
        user = ManagedUser(str(3100 + len(self.managed_users)), external_id)
        self.managed_users.append(user)
        return user

    def error_doc(self, status: int, note: str) -> dict[str, Any]:
        return {"message": note}

    def _managed_user(self, raw_segment: str) -> str | None:
        """The customer a path's ``:id`` names (its id, or ``E`` + external id)."""
        value = unquote(raw_segment)
        for user in self.managed_users:
            if value in (user.id, "E" + user.external_id):
                return user.id
        return None

    def _route(self, req: Exchange) -> tuple[bool, tuple[str | None, ...]]:
        """(whether v2, the raw path segments that name the target)."""
        if (v1 := self._V1.fullmatch(req.raw_path)) is not None:
            return False, v1.groups()
        if (v2 := self._V2.fullmatch(req.raw_path)) is not None:
            return True, v2.groups()
        raise self.refuse(404, "Not found")

    def _target(self, v2: bool, segments: tuple[str | None, ...]) -> AccessProfile:
        """The access profile or API key the path names, or a 404."""
        if not v2:
            raw_id = unquote(segments[0] or "")
            found = self.profiles.get(int(raw_id)) if raw_id.isdigit() else None
            if found is None or found.managed_user is not None:
                raise self.fail(404, "Access profile not found")
            return found
        user_seg, client_seg, key_seg = segments
        user = None if user_seg is None else self._managed_user(user_seg)
        if user_seg is not None and user is None:
            raise self.fail(404, "Managed user not found")
        key_id, client_id = unquote(key_seg or ""), unquote(client_seg or "")
        found = self.profiles.get(int(key_id)) if key_id.isdigit() else None
        if found is None or str(found.api_client_id) != client_id or found.managed_user != user:
            raise self.fail(404, "API key not found")
        return found

    def answer(self, req: Exchange) -> Reply:
        v2, segments = self._route(req)
        if req.method != "PUT":
            raise self.refuse(405, f"{req.method} not allowed: refresh_secret is PUT")
        if req.raw or req.query or req.content_type:
            raise self.refuse(400, "refresh_secret takes no body and no query parameters")
        bearer = req.bearer()
        if bearer is None:
            raise self.refuse(401, "Authorization: Bearer <api_token> required")
        live = {p.token for p in self.profiles.values()}
        if bearer in live or bearer in self.dead:
            raise self.refuse(401, "the bearer is an access-profile secret, not the API token")
        if bearer != self.api_token:
            raise self.fail(401, "Unauthorized")
        self.uses[bearer] += 1
        profile = self._target(v2, segments)
        canned = self.scripted()
        if canned is not None:
            return canned
        if profile.auth_type == "jwt":
            raise self.fail(400, "Refreshing the secret is not supported for JWT access profiles")
        self.dead.add(profile.token)
        profile.rotations += 1
        profile.token = new_token(f"wk{profile.id}")
        profile.issued.append(profile.token)
        return Reply(200, self._v2_doc(profile) if v2 else self._v1_doc(profile))

    def _new_secret(self, profile: AccessProfile, *, token_field: str) -> dict[str, Any]:
        if profile.auth_type == "oauth2":
            profile.oauth_client_id = new_token("wkcid")
            return {
                "oauth_client_id": profile.oauth_client_id,
                "oauth_client_secret": profile.token,
            }
        return {token_field: profile.token}

    def _v1_doc(self, profile: AccessProfile) -> dict[str, Any]:
        return {
            "id": profile.id,
            "name": profile.name,
            "api_client_id": profile.api_client_id,
            "api_collection_ids": [1, 2],
            "active": True,
            "auth_type": profile.auth_type,
            "ip_allow_list": [],
            "created_at": "2024-01-15T11:50:32.986-07:00",
            "updated_at": "2024-01-15T11:50:32.986-07:00",
        } | self._new_secret(profile, token_field="secret")

    def _v2_doc(self, profile: AccessProfile) -> dict[str, Any]:
        key = {
            "id": profile.id,
            "name": profile.name,
            "auth_type": profile.auth_type,
            "ip_allow_list": [],
            "ip_deny_list": [],
            "active": True,
            "active_since": "2025-06-02T09:14:27.000Z",
        } | self._new_secret(profile, token_field="auth_token")
        return {"data": key}


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

    def __init__(
        self,
        client_id: str = "wm-client",
        client_secret: str = "wm-secret",  # noqa: S107
        *,
        require_post: bool = True,
    ) -> None:
        super().__init__(client_id, client_secret)
        self.lifetime = "3600"  # typed String by the service
        #: watt.server.oauth.requirePost; false also takes GET, parameters in the query
        self.require_post = require_post

    @property
    def token_url(self) -> str:
        return self.base_url + self.PATH

    def answer(self, req: Exchange) -> Reply:
        if req.path != self.PATH:
            raise self.refuse(404, "service not found")
        if req.method == "GET" and not self.require_post:
            if req.raw:
                raise self.refuse(400, "GET takes its parameters in the query")
            form = req.query
        elif req.method != "POST":
            raise self.refuse(405, f"{req.method}: watt.server.oauth.requirePost is true")
        else:
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
