"""worker.client's listing: server-side filters over every credential, a
stable order, a total and cursor paging, and never a token in a row."""

from __future__ import annotations

import pytest

from tests.test_client import stop_as, world
from worker.client import ClientConfigError, CredentialInfo, connect, connect_sync
from worker.models import Status

pytestmark = pytest.mark.anyio


async def test_list_filters_over_all_credentials_then_pages(redis_url: str) -> None:
    async with world(redis_url, count=25) as (settings, store, _, grants), connect(settings) as c:
        for n in (3, 17, 24):
            await stop_as(store, f"cred-{n:05d}", "needs_reauth", "invalid_grant")
        broken = await c.list(status="needs_reauth")
        assert [r.credential_id for r in broken.rows] == ["cred-00003", "cred-00017", "cred-00024"]
        assert (broken.total, broken.truncated, broken.next_cursor) == (3, False, None)

        seen: list[str] = []
        page = await c.list(status=Status.ACTIVE, limit=10)
        while True:
            assert page.total == 22
            seen += [r.credential_id for r in page.rows]
            if page.next_cursor is None:
                break
            page = await c.list(status=Status.ACTIVE, limit=10, after=page.next_cursor)
        assert seen == sorted(set(grants) - {"cred-00003", "cred-00017", "cred-00024"})
        assert (await c.list(profile="p", limit=1)).total == 25
        assert (await c.list(profile="nope")).total == 0

        row = broken.rows[0]
        assert isinstance(row, CredentialInfo)
        assert not any("token" in name for name in CredentialInfo.__slots__)
        assert grants["cred-00003"].access_token not in repr(row)

        with pytest.raises(ClientConfigError, match="status"):
            await c.list(status="sleepy")
        with pytest.raises(ClientConfigError, match="limit"):
            await c.list(limit=0)


def test_the_sync_client_lists_too(redis_url: str) -> None:
    import anyio

    async def seeded() -> None:
        async with world(redis_url, count=3):
            pass

    anyio.run(seeded, backend="asyncio")
    from tests.harness import make_settings

    with connect_sync(make_settings(redis_url)) as client:
        listed = client.list(limit=2)
    assert ([r.credential_id for r in listed.rows], listed.total) == (
        ["cred-00000", "cred-00001"],
        3,
    )
    assert listed.next_cursor == "cred-00001"
