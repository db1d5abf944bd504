"""The token script's JSON answer (what non-Python consumers read) against a
real Redis: the same facts as the list the Python client parses, `null` for
an unknown credential, kept extras as an object, never the refresh token;
and `refreshd consumer script` prints exactly what the Python client loads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import zlib
from importlib import resources
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.harness import make_settings, seed
from worker.app import open_store
from worker.codec import text_form
from worker.consumer_script import token_script_sha, token_script_source
from worker.fakeprovider import FakeProvider
from worker.redisio import load_script
from worker.store import Store

pytestmark = pytest.mark.anyio

CRED = "cred-00000"


async def token_call(store: Store, cred_id: str, seen: str, *fmt: str) -> Any:
    part = store.keys.partition_of(cred_id)
    return await store.client.eval(
        token_script_source(), 3, part.cred(cred_id), part.due, part.lock(cred_id),
        cred_id, seen, store.keys.wake, *fmt,
    )  # fmt: skip


async def test_the_json_answer_carries_what_the_list_carries(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, open_store(settings) as store:
        grants = await seed(store, fake, 1, expires_in=3600)
        await set_extra(store, {"instance_url": "https://eu.example"})
        listed = await token_call(store, CRED, "")
        answer = json.loads(await token_call(store, CRED, "", "json"))
        missing = await token_call(store, "no-such", "", "json")
        asked = json.loads(await token_call(store, CRED, "0", "json"))
    grant = grants[CRED]
    (status, profile, version, access, token_type, expires_at, scope, _extra, failures, reason,
     refreshed_at, due, action, receivers) = listed  # fmt: skip
    assert answer == {
        "id": CRED, "status": status, "profile": profile, "version": int(version),
        "access_token": access, "token_type": token_type, "expires_at": int(expires_at),
        "scope": scope, "extra": {"instance_url": "https://eu.example"},
        "failures": int(failures), "reason": reason,
        "refreshed_at": int(refreshed_at or 0), "due_at": int(due), "action": action,
        "receivers": receivers,
    }  # fmt: skip
    assert (answer["access_token"], answer["status"]) == (grant.access_token, "active")
    assert grant.refresh_token not in json.dumps(answer)
    assert missing == "null"
    assert asked["action"] == "asked"  # the min-TTL request, in JSON too
    assert asked["due_at"] <= answer["due_at"]


async def set_extra(store: Store, extra: dict[str, str] | str) -> None:
    """Store kept answer fields in the packed record, through ``record.lua``
    as the workers' commit does (``keep_fields``); a str as it is (encoded)."""
    part = store.keys.partition_of(CRED)
    record = (resources.files("worker") / "scripts" / "record.lua").read_text()
    script = "local rec = rec_load(KEYS[1]); rec_set(rec, 'extra', ARGV[1]); rec_save(KEYS[1], rec)"
    value = extra if isinstance(extra, str) else json.dumps(extra)
    await store.client.eval(record + script, 1, part.cred(CRED), value)


@pytest.mark.parametrize("size", [29, 30, 31, 32, 700])
async def test_the_script_turns_the_record_form_into_the_text_form_python_makes(
    redis_url: str, size: int
) -> None:
    """The script's base64url equals Python's for every length modulo 3
    (bytes 0-255 all present), so a consumer sees what events carry."""
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, open_store(settings) as store:
        await seed(store, fake, 1, expires_in=3600)
        body = bytes(range(256)) * 3
        record = (b"\xffk1." + body[:size]).decode("utf-8", "surrogateescape")
        await set_extra(store, record)
        answer = json.loads(await token_call(store, CRED, "", "json"))
    assert answer["extra_encrypted"] == text_form(record)
    assert answer["extra_encrypted"].startswith("e1.k1.")


async def test_the_printed_script_is_the_one_the_python_client_loads(redis_url: str) -> None:
    settings = make_settings(redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    source = await anyio.run_process([sys.executable, "-m", "worker", "consumer", "script"],
                                     env=env)  # fmt: skip
    sha = await anyio.run_process([sys.executable, "-m", "worker", "consumer", "script", "--sha"],
                                  env=env)  # fmt: skip
    async with open_store(settings) as store:
        registered = load_script(store.client, "token")
    assert source.stdout.decode() == token_script_source()
    assert sha.stdout.decode().strip() == token_script_sha() == registered.sha
    assert registered.sha == hashlib.sha1(source.stdout).hexdigest()  # noqa: S324


async def test_with_encryption_the_json_answer_opens_as_the_readme_says(redis_url: str) -> None:
    """A consumer in another language holds the ring and decrypts the
    answer's access token and kept extras with nothing but AES-GCM, raw
    inflate and the associated data as README "Encryption at rest" states."""
    key = bytes(range(32))
    settings = make_settings(redis_url, encryption_keys="k1:" + base64.b64encode(key).decode())
    async with FakeProvider() as fake, open_store(settings) as store:
        grants = await seed(store, fake, 1, expires_in=3600)
        extra = {"instance_url": "https://eu.example", "id_token": "eyJ.x.y"}
        # as a record holds it: the record form (raw bytes), which the
        # script turns into the text form
        stored = store.encode(CRED, "extra", json.dumps(extra))
        assert isinstance(stored, bytes)
        assert stored.startswith(b"\xffk1.")
        await set_extra(store, stored.decode("utf-8", "surrogateescape"))
        answer = json.loads(await token_call(store, CRED, "", "json"))
    assert answer["extra"] == {}
    assert grants[CRED].access_token not in json.dumps(answer)

    def opened(value: str, field: str) -> str:
        mark, kid, body = value.split(".", 2)
        assert (mark, kid) == ("e1", "k1")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        aad = b"e1.k1." + b"".join(b"%d:%s" % (len(p), p) for p in (
            b"refreshd:", b"credential", CRED.encode(), field.encode()))  # fmt: skip
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], aad)
        data = zlib.decompress(plain[1:], -15) if plain[0] == 1 else plain[1:]
        return data.decode()

    assert opened(answer["access_token"], "access_token") == grants[CRED].access_token
    assert json.loads(opened(answer["extra_encrypted"], "extra")) == extra
