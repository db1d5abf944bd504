"""Least-privilege Redis users: the ACL rules of refreshd's applications, workers and operators.

Key and channel permissions are the real fence: a user allowed EVAL may run
any Lua, but every command inside a script is checked against the same ACL.
So a consumer may only read credentials, the layout hash and the event log;
it may ZADD only on the due sets and PUBLISH only on the wake channel
(``refresh=True``), and it holds no SET, HSET, DEL, XADD or any other write,
so the claim, spend, commit and upsert scripts are refused at their first
write. EVAL declares its keys as read-write, hence the selector that grants
``~`` on the token script's three keys to EVAL/EVALSHA alone. README "Least
privilege" says what a consumer can still do.
"""

from __future__ import annotations

from worker.keys import Keyspace

__all__ = [
    "CONSUMER_USER",
    "OPERATOR_USER",
    "READER_USER",
    "WORKER_USER",
    "acl_file",
    "acl_rules",
    "key_tag_patterns",
    "operator_acl_rules",
    "worker_acl_rules",
]

#: the user names the shipped ACL file (deploy/redis/acl.conf) defines
CONSUMER_USER = "refreshd-consumer"
READER_USER = "refreshd-reader"
WORKER_USER = "refreshd-worker"
OPERATOR_USER = "refreshd-operator"

_GLOB_SPECIAL = "\\*?[]"


def key_tag_patterns(keys: Keyspace) -> list[str]:
    """Glob patterns matching the partition hash tags ``{<prefix><n>}`` and
    nothing else: digits only, one pattern per digit count, so another
    installation whose prefix merely starts with this one (``refreshd:staging:``)
    is not matched, as ``{refreshd:*}`` would."""
    prefix = _escape(keys.prefix)
    digits = len(str(keys.partitions - 1))
    patterns = ["{" + prefix + "[0-9]}"]
    patterns += ["{" + prefix + "[1-9]" + "[0-9]" * (d - 1) + "}" for d in range(2, digits + 1)]
    return patterns


def acl_rules(keys: Keyspace, *, refresh: bool = True) -> list[str]:
    """ACL SETUSER rules (without ``on`` or a password) for an application:
    read tokens through the token script, follow the event log (XREAD, and
    consumer groups when ``refresh``), subscribe to the events channel; with
    ``refresh``, ask for a min-TTL refresh (ZADD on the due sets, PUBLISH on
    the wake channel). Nothing else: no write to a credential, a lock, a
    profile or the log."""
    tags = key_tag_patterns(keys)

    def under(suffix: str, mode: str) -> list[str]:
        return [f"{mode}~{tag}:{suffix}" for tag in tags]

    script_keys = [*under("cred:*", ""), *under("due", ""), *under("lock:*", "")]
    rules = [
        "resetkeys", "resetchannels", "-@all",
        # connecting (AUTH, HELLO, CLIENT SETINFO, PING) but no CLIENT KILL/LIST;
        # CLIENT TRACKING (in @connection, named so that it stays) keeps the
        # client's token cache current (worker.client.tracking)
        "+@connection", "-@dangerous", "+client|tracking",
        # what token.lua runs; SCRIPT LOAD for EVALSHA after a restart
        "+get", "+zscore", "+exists", "+time", "+script|load",
        # the layout check at connect; following the log; live events
        "+hmget", "+xread", "+xrange", "+xrevrange", "+multi", "+exec", "+discard",
        "+subscribe", "+unsubscribe", "+ssubscribe", "+sunsubscribe",
        # a Redis Cluster client reads the slot map first
        "+cluster|slots",
        *under("cred:*", "%R"), *under("due", "%R"), *under("lock:*", "%R"), *under("log", "%R"),
        f"%R~{_escape(keys.layout)}",
        # live events: one channel, or on a Redis Cluster a shard channel per partition
        f"&{_escape(keys.events)}", *(f"&{tag}:events" for tag in tags),
        # EVAL declares its keys read-write: grant that to the script call
        # alone; the commands inside are checked against the rules above
        "(" + " ".join(["+eval", "+evalsha", *script_keys]) + ")",
    ]  # fmt: skip
    if refresh:
        rules += [
            "(" + " ".join(["+zadd", *under("due", "")]) + ")",
            f"(+publish &{_escape(keys.wake)})",
            # consumer groups: their state lives in the streams (no XADD, XDEL, XTRIM)
            "(" + " ".join(["+xreadgroup", "+xack", "+xautoclaim", "+xclaim", "+xgroup|create",
                            "+xinfo|groups", *under("log", "")]) + ")",
        ]  # fmt: skip
    return rules


# Every command refreshd's own processes send, by what needs it. A command
# missing here is refused with NOPERM (tests/test_acl.py runs a worker and
# the operator commands as these users and reads ACL LOG); nothing in
# @dangerous or @admin is granted but the server check's INFO and CONFIG
# GET, and nothing that reaches every key (KEYS, FLUSHALL, RANDOMKEY).
_CONNECT = ("+@connection", "-@dangerous")  # AUTH, HELLO, CLIENT SETINFO, PING, SELECT
#: the server check at start and every 5 s (worker.serverchecks); the
#: durability waits of each spend and commit
_SERVER = ("+info", "+config|get", "+waitaof", "+wait")
#: the scripts (EVALSHA; SCRIPT LOAD after NOSCRIPT, SCRIPT EXISTS before a
#: pipeline of script calls) and every command they
#: run (worker/scripts/*.lua), which the ACL checks one by one
_SCRIPTS = (
    "+eval", "+evalsha", "+script|load", "+script|exists",
    "+get", "+set", "+del", "+exists", "+pexpire", "+pttl", "+time", "+hincrby",
    "+zadd", "+zrem", "+zrange", "+zscore", "+xadd", "+xtrim", "+xrevrange", "+publish",
    "+spublish",  # commit.lua's event on a Redis Cluster's shard channel
)  # fmt: skip
#: the worker's own calls: layout check, profiles, counters, horizon gauge,
#: wake-ups (pipelines in MULTI/EXEC)
_WORKER = (
    "+hsetnx", "+hset", "+hget", "+hmget", "+hgetall", "+zcard", "+zcount",
    "+subscribe", "+unsubscribe", "+multi", "+exec", "+discard",
    # on a Redis Cluster: the slot map, a migrating slot's redirection and
    # the shard channels (worker.cluster, worker.eventsub)
    "+cluster|slots", "+cluster|shards", "+asking", "+ssubscribe", "+sunsubscribe",
)  # fmt: skip
#: the operator commands on top: listings and key rotation walk the keyspace
#: (SCAN per partition pattern), profiles are written and deleted, watch
#: reads the event log
_OPERATOR = ("+scan", "+unlink", "+xread", "+xrange", "+xlen")


def worker_acl_rules(keys: Keyspace) -> list[str]:
    """ACL rules for ``refreshd run``: the commands it sends (and no other),
    on this installation's keys and channels only. Profiles are read-only:
    a worker never writes one, so a stolen worker password cannot point a
    profile's token URL elsewhere."""
    return _own_rules(keys, (*_CONNECT, *_SERVER, *_SCRIPTS, *_WORKER), profiles="%R")


def operator_acl_rules(keys: Keyspace) -> list[str]:
    """ACL rules for the operator commands (``profile``, ``credential``,
    ``key``, ``status``, ``watch``): the worker's commands (``credential
    refresh`` runs a refresh) plus walking the keyspace and deleting, with
    profiles writable."""
    return _own_rules(keys, (*_CONNECT, *_SERVER, *_SCRIPTS, *_WORKER, *_OPERATOR), profiles="")


def _own_rules(keys: Keyspace, commands: tuple[str, ...], *, profiles: str) -> list[str]:
    """refreshd's own processes: ``commands`` on the partitions' keys, the
    layout, the horizon and the rate limiters (read-write), the profiles
    (``profiles`` is the mode: ``%R`` read-only, ``""`` read-write), the two
    channels."""
    any_limiter = _escape(keys.rate_limit("\0")).replace("\0", "*")
    profile_keys = (_escape(keys.profiles), _escape(keys.profile("")) + "*")
    return [
        "resetkeys", "resetchannels", "-@all", *commands,
        *(f"~{tag}:*" for tag in key_tag_patterns(keys)),
        *(f"~{_escape(name)}" for name in (keys.layout, keys.refresh_horizon)),
        f"~{any_limiter}",
        *(f"{profiles}~{name}" for name in profile_keys),
        *(f"&{_escape(name)}" for name in (keys.events, keys.wake)),
        # the commit script's SPUBLISH on a Redis Cluster (worker.eventsub)
        *(f"&{tag}:events" for tag in key_tag_patterns(keys)),
    ]  # fmt: skip


def acl_file(keys: Keyspace) -> str:
    """The users as ACL file lines (the format takes no comments), enabled
    but without a password: one cannot log in until a ``>password`` or
    ``#<sha256>`` is added to its line, so the file is safe as shipped."""
    return (
        f"user {CONSUMER_USER} on {' '.join(acl_rules(keys, refresh=True))}\n"
        f"user {READER_USER} on {' '.join(acl_rules(keys, refresh=False))}\n"
        f"user {WORKER_USER} on {' '.join(worker_acl_rules(keys))}\n"
        f"user {OPERATOR_USER} on {' '.join(operator_acl_rules(keys))}\n"
    )


def _escape(name: str) -> str:
    return "".join(f"\\{c}" if c in _GLOB_SPECIAL else c for c in name)
