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
        # connecting (AUTH, HELLO, CLIENT SETINFO, PING) but no CLIENT KILL/LIST
        "+@connection", "-@dangerous",
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


def worker_acl_rules(keys: Keyspace) -> list[str]:
    """ACL rules for ``refreshd run`` and the operator commands: every
    command but the dangerous ones (plus the server checks' INFO and CONFIG
    GET), on this installation's keys and channels only."""
    return [
        "resetkeys", "resetchannels", "-@all", "+@all", "-@dangerous", "+info", "+config|get",
        *(f"~{tag}:*" for tag in key_tag_patterns(keys)),
        *(f"~{_escape(name)}" for name in (keys.layout, keys.profiles)),
        f"~{_escape(keys.profile(''))}*",
        *(f"&{_escape(name)}" for name in (keys.events, keys.wake)),
        # the commit script's SPUBLISH on a Redis Cluster (worker.eventsub)
        *(f"&{tag}:events" for tag in key_tag_patterns(keys)),
    ]  # fmt: skip


def acl_file(keys: Keyspace) -> str:
    """The users as ACL file lines (the format takes no comments), enabled
    but without a password: one cannot log in until a ``>password`` or
    ``#<sha256>`` is added to its line, so the file is safe as shipped. The
    worker and the operator get the same rules under two names, so either
    can be revoked alone."""
    worker = " ".join(worker_acl_rules(keys))
    return (
        f"user {CONSUMER_USER} on {' '.join(acl_rules(keys, refresh=True))}\n"
        f"user {READER_USER} on {' '.join(acl_rules(keys, refresh=False))}\n"
        f"user {WORKER_USER} on {worker}\n"
        f"user {OPERATOR_USER} on {worker}\n"
    )


def _escape(name: str) -> str:
    return "".join(f"\\{c}" if c in _GLOB_SPECIAL else c for c in name)
