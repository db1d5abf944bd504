"""Provider profiles in Redis: CRUD for operators, a small cache for workers.

Semantics follow the custom-OAuth-profile API refreshd's users know (seed
004): list pages with ``page`` (from 1) and ``per_page`` (1-100, default
100); create and update validate every field; client secrets are never
returned by list or get; delete refuses while credentials still use the
profile unless forced, and a forced delete removes those credentials too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import anyio

from worker.codec import SecretCodec, SecretContext
from worker.errors import ConfigError, Conflict, NotFound, SecretUnreadable, StoreUnavailable
from worker.listing import CredentialFilter, matching_ids
from worker.logs import get_logger
from worker.models import Profile, validate_id
from worker.presets import apply_preset, deprecation_notice, reapply_preset
from worker.redisio import guard
from worker.store import Store

__all__ = ["ProfileCache", "ProfileStore"]

_FIELDS = [f.name for f in fields(Profile)]

log = get_logger("refreshd.profiles")


def _ctx(prefix: str, profile_id: str, name: str) -> SecretContext:
    return SecretContext(prefix, "profile", profile_id, name)


def _to_hash(profile: Profile, codec: SecretCodec, prefix: str) -> dict[str, str]:
    """Flat strings for a Redis hash; secrets through the codec."""
    out: dict[str, str] = {}
    for name, value in profile.to_fields().items():
        if name == "client_secret":
            out[name] = codec.encode(value, _ctx(prefix, profile.id, name)) if value else ""
        elif name == "secret_params":
            secrets = json.dumps(value, sort_keys=True)
            out[name] = codec.encode(secrets, _ctx(prefix, profile.id, name)) if value else ""
        elif isinstance(value, dict | list):
            out[name] = json.dumps(value, sort_keys=True)
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        else:
            out[name] = str(value)
    return out


def _from_hash(raw: dict[str, str], codec: SecretCodec, prefix: str, profile_id: str) -> Profile:
    return Profile.from_mapping(_stored_fields(raw, codec, prefix, profile_id))


def _stored_fields(
    raw: dict[str, str],
    codec: SecretCodec,
    prefix: str,
    profile_id: str,
    *,
    unreadable: list[str] | None = None,
) -> dict[str, Any]:
    """The stored fields, secrets decoded, not yet validated: an update must
    be able to repair a profile that a newer release's rules refuse (a
    private token host stored before ``allow_private_network`` existed).
    A secret that does not decrypt raises ``SecretUnreadable``, or, given
    ``unreadable``, is left out and named there (showing and repairing
    such a profile needs no secret)."""
    data: dict[str, Any] = {k: v for k, v in raw.items() if k in _FIELDS}
    for name in ("client_secret", "secret_params"):
        if data.get(name):
            try:
                data[name] = codec.decode(data[name], _ctx(prefix, profile_id, name))
            except SecretUnreadable:
                if unreadable is None:
                    raise
                unreadable.append(name)
                del data[name]
    return data


def _warn_if_private(profile: Profile) -> None:
    """An unsafe mode is explicit and said out loud (``worker.egress``)."""
    if profile.allow_private_network:
        log.warning(
            "profile.private_network_allowed",
            profile_id=profile.id,
            detail="token requests may go to loopback, private and link-local addresses",
        )


def _warn_if_deprecated(profile: Profile) -> None:
    """The provider will switch this endpoint off: say so when it is set."""
    notice = deprecation_notice(profile.token_url)
    if notice:
        log.warning("profile.endpoint_deprecated", profile_id=profile.id, detail=notice)


class ProfileStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.codec = store.codec

    def _pipeline(self) -> Any:
        """The profile hash and the index in one MULTI on one server. On a
        cluster they live in different slots, where MULTI cannot span them:
        the two writes are then sent together but not atomically (the
        index is only for listing; a profile is found by its own key)."""
        return self.client.pipeline(transaction=self.store.router is None)

    async def create(self, data: dict[str, Any]) -> dict[str, Any]:
        profile = Profile.from_mapping(apply_preset(data))
        _warn_if_private(profile)
        _warn_if_deprecated(profile)
        key = self.keys.profile(profile.id)
        now = str(int(time.time() * 1000))
        # HSETNX on "id" makes creation atomic: two racing creators cannot
        # both believe they made it.
        if not await guard(self.client.hsetnx(key, "id", profile.id)):
            raise Conflict(f"profile {profile.id!r} already exists")
        mapping: dict[Any, Any] = _to_hash(profile, self.codec, self.keys.prefix)
        mapping |= {"created_at": now, "updated_at": now}
        pipe = self._pipeline()
        pipe.hset(key, mapping=mapping)
        pipe.zadd(self.keys.profiles, {profile.id: 0})
        await guard(pipe.execute())
        return await self.get(profile.id)

    async def update(self, profile_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge ``changes`` over the stored profile; a secret not given is
        kept; a ``preset`` given is applied again (``reapply_preset``)."""
        validate_id("profile", profile_id)
        raw: dict[str, str] = await guard(self.client.hgetall(self.keys.profile(profile_id)))
        if not raw or "token_url" not in raw:
            raise NotFound(f"no profile {profile_id!r}")
        lost: list[str] = []
        current = _stored_fields(raw, self.codec, self.keys.prefix, profile_id, unreadable=lost)
        for name in lost:  # replacing a secret that does not decrypt repairs it
            if name not in changes:
                raise SecretUnreadable(
                    "undecryptable",
                    f"profile {profile_id!r}: its stored {name} does not decrypt with this key "
                    f"ring; give a new {name} in this update",
                )
        if changes.get("id", profile_id) != profile_id:
            raise ConfigError("a profile's id cannot change; create a new profile")
        changes = dict(changes)
        if "secret_params" in changes:
            # secrets cannot be read back, so an update adds to them; a value
            # of None removes one
            stored_secrets = json.loads(current.get("secret_params") or "{}")
            merged_secrets = dict(stored_secrets) | dict(changes["secret_params"])
            changes["secret_params"] = {k: v for k, v in merged_secrets.items() if v is not None}
        profile = Profile.from_mapping(reapply_preset(current, changes))
        _warn_if_private(profile)
        _warn_if_deprecated(profile)
        mapping: dict[Any, Any] = _to_hash(profile, self.codec, self.keys.prefix)
        mapping["updated_at"] = str(int(time.time() * 1000))
        await guard(self.client.hset(self.keys.profile(profile_id), mapping=mapping))
        return await self.get(profile_id)

    async def load(self, profile_id: str) -> Profile:
        """The full profile, secret included: for the worker, never for output."""
        validate_id("profile", profile_id)
        key = self.keys.profile(profile_id)
        raw: dict[str, str] = await guard(self.client.hgetall(key))
        if not raw or "token_url" not in raw:
            raise NotFound(f"no profile {profile_id!r}")
        return _from_hash(raw, self.codec, self.keys.prefix, profile_id)

    async def get(self, profile_id: str) -> dict[str, Any]:
        """The public view (no secret). A secret that does not decrypt does
        not hide the profile: it is named in ``unreadable_secrets``."""
        validate_id("profile", profile_id)
        key = self.keys.profile(profile_id)
        raw: dict[str, str] = await guard(self.client.hgetall(key))
        if not raw or "token_url" not in raw:
            raise NotFound(f"no profile {profile_id!r}")
        lost: list[str] = []
        fields = _stored_fields(raw, self.codec, self.keys.prefix, profile_id, unreadable=lost)
        if "client_secret" in lost:  # stored and present; public() never shows it
            fields["client_secret"] = "[unreadable]"  # noqa: S105 - a placeholder, not a secret
        profile = Profile.from_mapping(fields)
        counts = await self.store.counters()
        out = profile.public() | {
            "credentials_count": counts.get(f"profile:{profile_id}", 0),
            "created_at": int(raw.get("created_at") or 0),
            "updated_at": int(raw.get("updated_at") or 0),
        }
        if lost:
            out["unreadable_secrets"] = lost
        return out

    async def list(self, *, page: int = 1, per_page: int = 100) -> list[dict[str, Any]]:
        if page < 1:
            raise ConfigError("page must be 1 or more")
        if not 1 <= per_page <= 100:
            raise ConfigError("per_page must be between 1 and 100")
        first = (page - 1) * per_page
        last = first + per_page - 1
        ids: list[str] = await guard(self.client.zrange(self.keys.profiles, first, last))
        return [await self.get(profile_id) for profile_id in ids]

    async def delete(
        self,
        profile_id: str,
        *,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Delete the profile; returns how many credentials went with it.
        ``progress(deleted_now, total)`` hears each batch of a forced delete.
        Nothing is decrypted: a profile whose secret is under a key no
        longer in the ring can still be deleted."""
        validate_id("profile", profile_id)
        if not await guard(self.client.hget(self.keys.profile(profile_id), "token_url")):
            raise NotFound(f"no profile {profile_id!r}")
        in_use = (await self.store.counters()).get(f"profile:{profile_id}", 0)
        if in_use and not force:
            raise Conflict(
                f"profile {profile_id!r} is used by {in_use} credential(s); delete them "
                "first or pass --force to delete them with it"
            )
        # The profile goes first: an import racing with this delete then
        # fails its own re-check instead of leaving credentials behind.
        pipe = self._pipeline()
        pipe.delete(self.keys.profile(profile_id))
        pipe.zrem(self.keys.profiles, profile_id)
        await guard(pipe.execute())
        return await self.delete_credentials_of(profile_id, progress=progress) if force else 0

    async def delete_credentials_of(
        self, profile_id: str, *, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """The profile's credentials, found server-side (``worker.listing``)
        and deleted 64 at a time: 20,000 took 45 s one by one."""
        ids = await matching_ids(self.store, CredentialFilter(profile=profile_id))
        removed = 0

        async def one(cred_id: str) -> None:
            nonlocal removed
            with contextlib.suppress(NotFound):  # deleted meanwhile
                await self.store.delete(cred_id, force=True)
                removed += 1

        for first in range(0, len(ids), 64):
            chunk = ids[first : first + 64]
            async with anyio.create_task_group() as tg:
                for cred_id in chunk:
                    tg.start_soon(one, cred_id)
            if progress is not None:
                progress(len(chunk), len(ids))
        return removed

    async def exists(self, profile_id: str) -> bool:
        return bool(await guard(self.client.exists(self.keys.profile(profile_id))))


class ProfileCache:
    """Workers read a profile per refresh; caching it for a few seconds
    turns that into one HGETALL per profile per interval. An update takes
    effect within ``ttl_s``."""

    def __init__(self, profiles: ProfileStore, *, ttl_s: float = 5.0) -> None:
        self._profiles = profiles
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Profile]] = {}
        self._loading: dict[str, asyncio.Future[Profile]] = {}

    async def get(self, profile_id: str) -> Profile:
        hit = self._cache.get(profile_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        # One load per profile at a time: when an entry expires, every
        # refresh in flight misses at once, and each used to read the hash.
        pending = self._loading.get(profile_id)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = self._loading[profile_id] = asyncio.get_running_loop().create_future()
        try:
            profile = await self._profiles.load(profile_id)
        except BaseException as exc:
            # a cancelled load says nothing about the profile: the others
            # see Redis as away for now (their leases bring them back)
            failure = exc if isinstance(exc, Exception) else StoreUnavailable("load cut off")
            pending.set_exception(failure)
            pending.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            self._cache[profile_id] = (now, profile)
            pending.set_result(profile)
            return profile
        finally:
            del self._loading[profile_id]
