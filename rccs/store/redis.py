"""The shared store: every rccs node of a cluster keeps its durable state in one Redis (``redis://HOST:PORT/DB``).

Theory of operation
===================

Client. redis-py's asyncio client with the hiredis parser (picked by redis-py when ``hiredis`` is installed):
the maintained client of the Redis project, with connection pooling, ``EVALSHA`` script caching and URL
parsing we would otherwise write ourselves. Every Redis error (refused connection, timeout, a full server
under ``maxmemory-policy noeviction``, a script error) reaches the caller as ``StoreError`` naming the server,
never as a redis-py exception.

Timeouts and retries. Connecting gives up after ``connect_timeout`` (2 s), a command after
``command_timeout`` (5 s): while Redis is down or hung a call fails within those bounds. redis-py is told
never to retry a command by itself: a mutation whose reply was lost may have run, and running it twice
(two inbox ids for one message, ``AlreadyExists`` for a user that was just added) is worse than an error the
caller can see and handle. A pooled connection whose server went away is noticed (redis-py reads its EOF)
and replaced before the next command is sent on it (this needs redis-py's "maintenance notifications" off,
see ``_WITHOUT_MAINTENANCE_NOTIFICATIONS``), so the store works again as soon as Redis is back, without being
reopened.

Atomicity. Every mutation is ONE Lua script (``EVALSHA``; redis-py loads the script again by itself when a
restarted or flushed server answers ``NOSCRIPT``), so it runs alone on the server: nothing of another
node's calls interleaves with it, and either all of its writes happen or, on a script error, the error is
raised before any write (the scripts check first and write after). Reads that must see one moment (an
inbox page, dead letters, a state catch-up) are read-only scripts as well.

State patches are the one exception, by choice: RFC 7396 merge patch, the "changes nothing" test (``1``,
``1.0`` and ``true`` differ) and the size limits are Python (``plan_state_patch``, ``mergepatch.py``), shared
with the other stores; Redis's Lua ``cjson`` would turn 64-bit integers into doubles and cannot tell ``1``
from ``1.0``, so a Lua port would need its own JSON code and would drift from the other stores. A patch is
an optimistic transaction instead: a read script returns the document, the user's byte total, the change log
and the user's state version (a counter every state write increments); Python plans the patch; a commit
script writes it only if the version is still the one read, else the patch is planned again on fresh data.
So each patch is applied against the state it was planned on, revisions go up by exactly one per change and
never back, and of two concurrent patches with ``if_rev`` only one can win.

Order. Calls of one store object take effect in the order they were made, as the SQLite store's do (its
one worker thread): the hub relies on it, e.g. it spawns ``add_user`` and then ``put_device`` for a device
first seen with a dev token, and the device would be refused if the second overtook the first. Every command
of a store object goes through one sender (``_command``) that writes what was asked during one turn of the
event loop as one pipeline on one connection, and the next turn's only after those replies: Redis runs the
commands of one connection in the order they arrive, so a call's command never overtakes an earlier call's,
while many calls share one round trip (one call in flight at a time cost a round trip and a wake-up per call,
and under load the calls queued behind each other: ``docs/performance.md``, "Several nodes"). A call made of
several commands (a state patch: read, plan in Python, commit) can have another call's command between its
own; each such call is safe against that already, because another node's commands can come between them too.
After a Redis restart, scripts a pipeline found missing (``NOSCRIPT``) are loaded and those commands sent
again, after the rest of their pipeline: nothing of a script ran when it was missing, but a command of the
same pipeline that was not a script (a read) may have run before it.
Calls of different store objects (nodes) interleave as Redis runs them.

Ids. Inbox ids and change-feed sequence numbers come from ``INCR`` counters inside the scripts that use
them, so they increase in commit order, across every node, and are never handed out twice.

Key layout (``P`` is the key prefix, ``rccs:`` by default; ``{user}`` is the user id as a hash tag):

=====================================  ===========  ============================================================
key                                    type         contents; who deletes it
=====================================  ===========  ============================================================
``P schema``                           string       layout version (1); kept
``P users``                            hash         user id -> created ms; ``remove_user``
``P devices``                          set          every device id, revoked tombstones too; kept (ids stay dead)
``P device:<id>``                      hash         user, created, rec (JSON: type, name, platform, version,
                                                    capabilities, metadata), status, last_seen,
                                                    credential_hash, revoked_at; kept as a tombstone
``P {user}:devices``                   set          device ids of the user (tombstones too); kept
``P credentials``                      hash         credential hash -> device id; revocation, ``put_device``
``P sessions``                         set          every session id; deleting a session
``P session:<id>``                     hash         the session's fields, ``pending`` msgpack; stale-session
                                                    sweep, ``remove_user``
``P {user}:sessions``                  set          session ids of the user; as above
``P device-sessions:<device>``         set          session ids of the device; as above
``P pairing:<code>``                   hash         the code's fields; ``delete_pairing_codes_before``,
                                                    ``remove_user``
``P pairing-expiry``                   zset         code -> expires_at; as above
``P {user}:pairing``                   set          the user's codes; as above
``P queued-seq``                       string       the last inbox id handed out; kept
``P msg:<id>``                         hash         a queued message: device, user, prio, size, exp, attempts,
                                                    blob (msgpack: sender, msg id, type, body, ts, receipt[,
                                                    work: a pick-one message's selector, order, devices tried]);
                                                    ack, expiry, drop, purge (renamed to ``dead:<id>``)
``P inbox:<device>``                   zset         ids in delivery order: score (4 - priority) * 2**48 + id
``P inbox-bytes:<device>``             string       the inbox's byte total; deleted with its last message
``P expiring``                         zset         id -> expires_at of queued messages that expire
``P dead:<id>``                        hash         a dead letter (``msg:<id>`` + reason, at); purge, redrive
``P dead``, ``P dead-device:<d>``,     zset         dead letter ids (score: id); as above
``P dead-user:<u>``
``P receipts:<device>``                list         msgpack receipts, oldest first; ``take_receipts``
``P receipts-waiting``                 set          devices whose ``receipts:`` list is not empty; ``take_receipts``
``P message-ids``                      hash         msgpack [device, id] -> msgpack [at, digest]: the ids nodes
                                                    remembered in memory, saved at their shutdowns (merged);
                                                    expired ones deleted by ``load_message_ids``
``P {user}:ids:<device>``              hash         id key ("i<int>"/"s<str>") -> body digest: the device's
                                                    recent new sends kept in inboxes (``enqueue`` with
                                                    ``IdMemory``) and its first_ack sends
                                                    (``remember_sends``); trimmed by both to the window and
                                                    the cap
``P {user}:id-times:<device>``         zset         id key -> when it was taken; as above
``P {user}:docs``                      hash         state document name -> size (0: deleted tombstone);
                                                    ``remove_user``
``P {user}:doc:<name>``                hash         rev, value (JSON; absent when deleted), size, by, updated
``P {user}:doc-log:<name>``            list         JSON [rev, patch, by, patch id JSON, at], newest last,
                                                    cut to ``keep_changes`` by each patch
``P {user}:state-version``             string       incremented by every state write (optimistic concurrency)
``P {user}:tasks``                     hash         task -> JSON [owner, epoch, expires, handoff, updated]
``P {user}:task-handoffs``             set          tasks with a handoff set; ``put_task``, ``remove_user``
``P task-notices``                     set          users with a task handoff set; as above
``P token-secret``                     string       the cluster's token signing secret (hex); kept
``P change-seq``                       string       the last change-feed seq; kept
``P changes``                          zset         seq -> "seq kind key"; cut to the newest
                                                    ``CHANGE_FEED_KEEP`` by each append
=====================================  ===========  ============================================================

Nothing expires by TTL: every key above has an owner that deletes it (the server's sweepers call
``delete_stale_sessions``, ``delete_pairing_codes_before`` and ``take_expired``; acks and purges delete
messages), and the rest are small and kept on purpose, as in the SQLite store. Record times are the
caller's clock, which need not be Redis's, so a Redis TTL could not follow the contract's cut-offs anyway.
Production runs ``maxmemory-policy noeviction``: a full Redis refuses writes (``StoreError``), it never
drops a key. The change feed is the one key that is cut: it keeps the newest ``CHANGE_FEED_KEEP`` changes,
far more than servers polling every second fall behind by.

Redis Cluster. The keys of one user that one script touches share the hash tag ``{user}`` (state
documents, their logs and version, tasks), so they would stay in one slot. The scripts build their key names
from the prefix and also touch keys of devices, inboxes and the change feed, which have no common tag: this
store needs one Redis primary (with replicas and failover as usual), not a Redis Cluster, today.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from ..mergepatch import json_size
from .base import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    OVERFLOW_REJECT,
    STATUS_AWAY,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    AlreadyExists,
    Change,
    DeadLetter,
    DeviceRecord,
    DeviceRefused,
    EnqueueOutcome,
    FenceMoved,
    IdMemory,
    OpenHandoff,
    PairingCode,
    PendingMessage,
    QueuedMessage,
    SessionRecord,
    StateCatchUp,
    StateChange,
    StateDoc,
    StatePatched,
    Store,
    StoreError,
    TaskLease,
    TaskRaced,
    UserRecord,
    check_policy,
    lease_fields,
    pack_receipt,
    parse_redis_url,
    plan_state_patch,
    state_patch_text,
    unpack_receipt,
    url_without_password,
)

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "rccs:"
CONNECT_TIMEOUT = 2.0  # seconds: an unreachable Redis fails a call after this
COMMAND_TIMEOUT = 5.0  # seconds: a hung Redis fails a call after this
CHANGE_FEED_KEEP = 100_000
ID_REPEATED, ID_CONFLICTING = -1, -2  # the enqueue script's answers for a message whose id was used recently
STATE_PATCH_ATTEMPTS = 50  # optimistic retries of one patch before giving up under contention
STALE_SCAN_PAGE = 500  # session ids per SSCAN page and script call of delete_stale_sessions

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # redis-py before 6.3 has no maintenance notifications, and always checks pooled connections
    _WITHOUT_MAINTENANCE_NOTIFICATIONS: dict[str, Any] = {}
else:
    # With them on ("auto", redis-py 8's default) the pool no longer checks a pooled connection for an EOF before
    # reusing it, so the first call after a Redis restart would fail on the dead connection (measured:
    # "Connection closed by server"). They serve Redis Enterprise's planned failovers, which rccs does not use.
    _WITHOUT_MAINTENANCE_NOTIFICATIONS = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}

# ---- Lua ------------------------------------------------------------------------------------------

# Shared by every script: ARGV[1] is the key prefix. Numbers go to Redis through num(): Lua would write a
# number of more than 14 digits in exponent form. less() orders strings by bytes, as Python orders them by
# code point (Lua's own < follows the server's locale).
PRELUDE = """
local P = ARGV[1]
local function num(x) return string.format('%.0f', x) end
local function ukey(user, name) return P .. '{' .. user .. '}:' .. name end
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
-- A fenced state write: does ``by`` own ``task``'s lease (JSON [owner, epoch, ...]) at ``epoch``? No task: yes.
local function holds_fence(user, task, by, epoch)
  if task == '' then return true end
  local lease = redis.call('HGET', ukey(user, 'tasks'), task)
  if not lease then return false end
  lease = cjson.decode(lease)
  return lease[1] == by and lease[2] == tonumber(epoch)
end
local function change(kind, key)
  local seq = redis.call('INCR', P .. 'change-seq')
  redis.call('ZADD', P .. 'changes', num(seq), num(seq) .. ' ' .. kind .. ' ' .. key)
  redis.call('ZREMRANGEBYRANK', P .. 'changes', 0, -(CHANGE_FEED_KEEP + 1))
end
local function mark_device_revoked(id, now)
  local key = P .. 'device:' .. id
  local credential = redis.call('HGET', key, 'credential_hash')
  if credential then
    if redis.call('HGET', P .. 'credentials', credential) == id then
      redis.call('HDEL', P .. 'credentials', credential)
    end
    redis.call('HDEL', key, 'credential_hash')
  end
  redis.call('HSET', key, 'revoked_at', now, 'status', 'offline')
end
local function delete_session(id)
  local key = P .. 'session:' .. id
  local owner = redis.call('HMGET', key, 'user', 'device')
  redis.call('DEL', key)
  redis.call('SREM', P .. 'sessions', id)
  if owner[1] then redis.call('SREM', ukey(owner[1], 'sessions'), id) end
  if owner[2] then redis.call('SREM', P .. 'device-sessions:' .. owner[2], id) end
end
-- Inboxes: a message's score puts higher priorities first, then lower ids.
local BLOCK = 281474976710656
local function score(priority, id) return num((4 - tonumber(priority)) * BLOCK + tonumber(id)) end
local function queued_record(key, id)
  local f = redis.call('HMGET', key, 'device', 'user', 'prio', 'exp', 'attempts', 'blob')
  return {id, f[1], f[2], f[3], f[4], f[5], f[6]}
end
local function queue(id)
  local f = redis.call('HMGET', P .. 'msg:' .. id, 'device', 'prio', 'size', 'exp')
  redis.call('ZADD', P .. 'inbox:' .. f[1], score(f[2], id), id)
  redis.call('INCRBY', P .. 'inbox-bytes:' .. f[1], f[3])
  if f[4] then redis.call('ZADD', P .. 'expiring', f[4], id) end
end
local function unqueue(id)
  local f = redis.call('HMGET', P .. 'msg:' .. id, 'device', 'size')
  local inbox = P .. 'inbox:' .. f[1]
  redis.call('ZREM', inbox, id)
  if redis.call('ZCARD', inbox) == 0 then
    redis.call('DEL', P .. 'inbox-bytes:' .. f[1])
  else
    redis.call('DECRBY', P .. 'inbox-bytes:' .. f[1], f[2])
  end
  redis.call('ZREM', P .. 'expiring', id)
end
-- A sender's new send: 0 (its id is remembered now), -1 (a repeat with the same body within the window), -2
-- (with another body). At most `keep` ids per sender are kept; older than the window go.
local function check_send(user, sender, idkey, digest, now, window, keep)
  local hashes, times = ukey(user, 'ids:' .. sender), ukey(user, 'id-times:' .. sender)
  local at = redis.call('ZSCORE', times, idkey)
  if at and tonumber(at) + window > now then
    if redis.call('HGET', hashes, idkey) == digest then return -1 else return -2 end
  end
  redis.call('HSET', hashes, idkey, digest)
  redis.call('ZADD', times, now, idkey)
  local old = redis.call('ZRANGEBYSCORE', times, '-inf', '(' .. num(now - window), 'LIMIT', 0, 100)
  local over = redis.call('ZCARD', times) - #old - keep
  if over > 0 then
    for _, gone in ipairs(redis.call('ZRANGE', times, #old, #old + over - 1)) do table.insert(old, gone) end
  end
  if #old > 0 then
    redis.call('ZREM', times, unpack(old))
    redis.call('HDEL', hashes, unpack(old))
  end
  return 0
end
""".replace("CHANGE_FEED_KEEP", str(CHANGE_FEED_KEEP))

SCRIPTS: dict[str, str] = {}

SCRIPTS["open"] = """
local version = redis.call('GET', P .. 'schema')
if not version then redis.call('SET', P .. 'schema', ARGV[2]); return tonumber(ARGV[2]) end
return tonumber(version)
"""

SCRIPTS["read_hashes"] = """
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('HGETALL', ARGV[i]) end
return out
"""

SCRIPTS["add_user"] = """
if redis.call('HSETNX', P .. 'users', ARGV[2], ARGV[3]) == 0 then return 0 end
change('user', ARGV[2])
return 1
"""

SCRIPTS["remove_user"] = """
local user, now = ARGV[2], ARGV[3]
if redis.call('HDEL', P .. 'users', user) == 0 then return 0 end
change('user', user)
local live = {}
for _, id in ipairs(redis.call('SMEMBERS', ukey(user, 'devices'))) do
  local f = redis.call('HMGET', P .. 'device:' .. id, 'revoked_at', 'created')
  if not f[1] then table.insert(live, {id, tonumber(f[2])}) end
end
table.sort(live, function(a, b) if a[2] ~= b[2] then return a[2] < b[2] end return less(a[1], b[1]) end)
for _, device in ipairs(live) do
  mark_device_revoked(device[1], now)
  change('device', device[1])
end
for _, id in ipairs(redis.call('SMEMBERS', ukey(user, 'sessions'))) do delete_session(id) end
for _, code in ipairs(redis.call('SMEMBERS', ukey(user, 'pairing'))) do
  redis.call('DEL', P .. 'pairing:' .. code)
  redis.call('ZREM', P .. 'pairing-expiry', code)
end
redis.call('DEL', ukey(user, 'pairing'))
for _, name in ipairs(redis.call('HKEYS', ukey(user, 'docs'))) do
  redis.call('DEL', ukey(user, 'doc:' .. name), ukey(user, 'doc-log:' .. name))
end
redis.call('DEL', ukey(user, 'docs'), ukey(user, 'state-version'), ukey(user, 'tasks'), ukey(user, 'task-handoffs'))
for _, id in ipairs(redis.call('SMEMBERS', ukey(user, 'devices'))) do
  redis.call('DEL', ukey(user, 'ids:' .. id), ukey(user, 'id-times:' .. id))
end
redis.call('SREM', P .. 'task-notices', user)
return 1
"""

# ARGV: id, user, credential ('' for none), '1' if the record is revoked, then field/value pairs of the record.
SCRIPTS["put_device"] = """
local id, user, credential = ARGV[2], ARGV[3], ARGV[4]
if ARGV[5] ~= '1' and redis.call('HEXISTS', P .. 'users', user) == 0 then return 'unknown user' end
local key = P .. 'device:' .. id
local old = redis.call('HMGET', key, 'revoked_at', 'credential_hash', 'user')
if old[1] then return 'revoked' end
if credential ~= '' then
  local holder = redis.call('HGET', P .. 'credentials', credential)
  if holder and holder ~= id then return 'credential taken' end
end
if old[2] and redis.call('HGET', P .. 'credentials', old[2]) == id then
  redis.call('HDEL', P .. 'credentials', old[2])
end
if old[3] and old[3] ~= user then redis.call('SREM', ukey(old[3], 'devices'), id) end
if credential ~= '' then redis.call('HSET', P .. 'credentials', credential, id) end
redis.call('DEL', key)
redis.call('HSET', key, unpack(ARGV, 6))
redis.call('SADD', P .. 'devices', id)
redis.call('SADD', ukey(user, 'devices'), id)
change('device', id)
return 'ok'
"""

SCRIPTS["find_device_by_credential"] = """
local id = redis.call('HGET', P .. 'credentials', ARGV[2])
if not id then return false end
return {id, redis.call('HGETALL', P .. 'device:' .. id)}
"""

SCRIPTS["revoke_device"] = """
local id, now = ARGV[2], ARGV[3]
local key = P .. 'device:' .. id
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then return 0 end
mark_device_revoked(id, now)
change('device', id)
local live = {}
for _, sid in ipairs(redis.call('SMEMBERS', P .. 'device-sessions:' .. id)) do
  local f = redis.call('HMGET', P .. 'session:' .. sid, 'revoked_at', 'user', 'created')
  if not f[1] then table.insert(live, {sid, f[2], tonumber(f[3])}) end
end
table.sort(live, function(a, b)
  if a[2] ~= b[2] then return less(a[2], b[2]) end
  if a[3] ~= b[3] then return a[3] < b[3] end
  return less(a[1], b[1])
end)
for _, session in ipairs(live) do
  redis.call('HSET', P .. 'session:' .. session[1], 'revoked_at', now)
  change('session', session[1])
end
return 1
"""

# ARGV: (device, status, last_seen) triples.
SCRIPTS["update_presence"] = """
for i = 2, #ARGV, 3 do
  local key = P .. 'device:' .. ARGV[i]
  if redis.call('EXISTS', key) == 1 and redis.call('HEXISTS', key, 'revoked_at') == 0 then
    redis.call('HSET', key, 'status', ARGV[i + 1], 'last_seen', ARGV[i + 2])
  end
end
return 1
"""

# ARGV per session: id, user, device, number of fields n, then n field/value pairs.
SCRIPTS["put_sessions"] = """
local i = 2
while i <= #ARGV do
  local id, user, device, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local first, last = i + 4, i + 3 + 2 * n
  i = last + 1
  if redis.call('HEXISTS', P .. 'device:' .. device, 'revoked_at') == 0 then
    local key = P .. 'session:' .. id
    local old = redis.call('HMGET', key, 'revoked_at', 'user', 'device')
    if old[2] and old[2] ~= user then redis.call('SREM', ukey(old[2], 'sessions'), id) end
    if old[3] and old[3] ~= device then redis.call('SREM', P .. 'device-sessions:' .. old[3], id) end
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(ARGV, first, last))
    if old[1] then redis.call('HSET', key, 'revoked_at', old[1]) end
    redis.call('SADD', P .. 'sessions', id)
    redis.call('SADD', ukey(user, 'sessions'), id)
    redis.call('SADD', P .. 'device-sessions:' .. device, id)
  end
end
return 1
"""

SCRIPTS["revoke_session"] = """
local key = P .. 'session:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then return 0 end
redis.call('HSET', key, 'revoked_at', ARGV[3])
change('session', ARGV[2])
return 1
"""

# ARGV: cutoff, grace (ms), then session ids (one SSCAN page): the staleness rule of session_is_stale, applied
# where the sessions are, so that a node never reads every session of the cluster to find the stale ones.
SCRIPTS["delete_stale_sessions"] = """
local cutoff, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local deleted = 0
for i = 4, #ARGV do
  local f = redis.call('HMGET', P .. 'session:' .. ARGV[i], 'connected_at', 'expires_at', 'revoked_at',
                       'disconnected_at')
  local connected = f[1] and f[1] ~= ''
  if f[2] and not connected then
    local revoked, gone = tonumber(f[3] or ''), tonumber(f[4] or '')
    if tonumber(f[2]) < cutoff or (revoked and revoked < cutoff) or (gone and gone + grace < cutoff) then
      delete_session(ARGV[i])
      deleted = deleted + 1
    end
  end
end
return deleted
"""

SCRIPTS["reset_live_state"] = """
local now = tonumber(ARGV[2])
for _, id in ipairs(redis.call('SMEMBERS', P .. 'devices')) do
  local key = P .. 'device:' .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'online' or status == 'away' then redis.call('HSET', key, 'status', 'offline') end
end
for _, id in ipairs(redis.call('SMEMBERS', P .. 'sessions')) do
  local key = P .. 'session:' .. id
  local f = redis.call('HMGET', key, 'connected_at', 'last_activity', 'connected_ms')
  if f[1] then
    local ended = now
    if f[2] and tonumber(f[2]) ~= 0 then ended = tonumber(f[2]) end
    local connected = tonumber(f[3] or '0') + math.max(0, ended - tonumber(f[1]))
    redis.call('HSET', key, 'connected_ms', num(connected), 'disconnected_at', num(ended))
    redis.call('HDEL', key, 'connected_at')
  end
end
return 1
"""

# ARGV: code, user, expires_at, then field/value pairs.
SCRIPTS["add_pairing_code"] = """
local key = P .. 'pairing:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, unpack(ARGV, 5))
redis.call('ZADD', P .. 'pairing-expiry', ARGV[4], ARGV[2])
redis.call('SADD', ukey(ARGV[3], 'pairing'), ARGV[2])
return 1
"""

# Lua compares strings by their interned identity, so the secret comparison takes no time that depends on
# where the secrets differ.
SCRIPTS["redeem_pairing_code"] = """
local key = P .. 'pairing:' .. ARGV[2]
local secret, now, max_attempts = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', key, 'secret_hash', 'expires_at', 'attempts', 'used_at')
if not f[1] or f[4] or tonumber(f[2]) <= now or tonumber(f[3]) >= max_attempts then return false end
if f[1] ~= secret then
  redis.call('HINCRBY', key, 'attempts', 1)
  return false
end
redis.call('HSET', key, 'used_at', ARGV[4])
return redis.call('HGETALL', key)
"""

SCRIPTS["delete_pairing_codes_before"] = """
local codes = redis.call('ZRANGEBYSCORE', P .. 'pairing-expiry', '-inf', '(' .. ARGV[2])
for _, code in ipairs(codes) do
  local key = P .. 'pairing:' .. code
  local user = redis.call('HGET', key, 'user')
  if user then redis.call('SREM', ukey(user, 'pairing'), code) end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'pairing-expiry', code)
end
return #codes
"""

# ARGV: now, idempotency window (ms), ids kept per sender, then per send: user, sender device, id key, body
# digest. Returns a verdict per send (check_send): for sends kept nowhere (first_ack), ids as enqueue keeps them.
SCRIPTS["remember_sends"] = """
local now, window, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local verdicts = {}
for i = 5, #ARGV, 4 do
  table.insert(verdicts, check_send(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], now, window, keep))
end
return verdicts
"""

# ARGV: max_count, max_bytes, '1' to reject (else drop oldest), now, idempotency window (ms; 0: no id
# check), ids kept per sender, then per message: device, user, priority, size, expires_at ('' for none),
# attempts, blob, sender device, id key ('' for none: not checked), body digest.
# Returns {ids (0: rejected, -1: a repeat of the id with the same body, -2: with another body), dropped}.
# The id check and the write are one atomic step, so two nodes taking the same id at once keep it once; the
# copies of one send (one per target, with the same sender and id) share the first copy's verdict.
SCRIPTS["enqueue"] = """
local max_count, max_bytes, reject = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local now, window, keep = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ids, dropped, verdicts = {}, {}, {}
for i = 8, #ARGV, 10 do
  local device, user, priority, size, expires, attempts, blob =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local sender, idkey, digest = ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local n = tonumber(size)
  local id = 0
  local verdict = 0
  if window > 0 and idkey ~= '' then
    local send = sender .. '\0' .. idkey
    verdict = verdicts[send]
    if verdict == nil then
      verdict = check_send(user, sender, idkey, digest, now, window, keep)
      verdicts[send] = verdict
    end
  end
  local revoked = redis.call('HEXISTS', P .. 'device:' .. device, 'revoked_at') == 1
  if verdict ~= 0 then
    id = verdict
  elseif not revoked and n <= max_bytes and max_count >= 1 then
    local inbox = P .. 'inbox:' .. device
    local count = redis.call('ZCARD', inbox)
    local bytes = tonumber(redis.call('GET', P .. 'inbox-bytes:' .. device) or '0')
    local fits = count < max_count and bytes + n <= max_bytes
    if not fits and not reject then
      while count >= max_count or bytes + n > max_bytes do
        local last = redis.call('ZRANGE', inbox, -1, -1, 'WITHSCORES')
        local lowest = math.floor(tonumber(last[2]) / BLOCK) * BLOCK
        local victim = redis.call('ZRANGEBYSCORE', inbox, num(lowest), '+inf', 'LIMIT', 0, 1)[1]
        local key = P .. 'msg:' .. victim
        table.insert(dropped, queued_record(key, victim))
        local victim_size = tonumber(redis.call('HGET', key, 'size'))
        unqueue(victim)
        redis.call('DEL', key)
        count = count - 1
        bytes = bytes - victim_size
      end
      fits = true
    end
    if fits then
      id = redis.call('INCR', P .. 'queued-seq')
      local key = P .. 'msg:' .. num(id)
      redis.call('HSET', key, 'device', device, 'user', user, 'prio', priority, 'size', size,
                 'attempts', attempts, 'blob', blob)
      if expires ~= '' then redis.call('HSET', key, 'exp', expires) end
      queue(num(id))
    end
  end
  table.insert(ids, id)
end
return {ids, dropped}
"""

SCRIPTS["inbox"] = """
local inbox, now, limit = P .. 'inbox:' .. ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local page, start = {}, 0
while #page < limit do
  local ids = redis.call('ZRANGE', inbox, start, start + 255)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = P .. 'msg:' .. id
    local expires = redis.call('HGET', key, 'exp')
    if not expires or tonumber(expires) > now then
      table.insert(page, queued_record(key, id))
      if #page >= limit then break end
    end
  end
  start = start + 256
end
return page
"""

SCRIPTS["inbox_size"] = """
return {redis.call('ZCARD', P .. 'inbox:' .. ARGV[2]), redis.call('GET', P .. 'inbox-bytes:' .. ARGV[2]) or '0'}
"""

SCRIPTS["remove_queued"] = """
local removed = {}
for i = 2, #ARGV do
  local key = P .. 'msg:' .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then
    table.insert(removed, queued_record(key, ARGV[i]))
    unqueue(ARGV[i])
    redis.call('DEL', key)
  end
end
return removed
"""

SCRIPTS["count_attempts"] = """
for i = 2, #ARGV do
  local key = P .. 'msg:' .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, 'attempts', 1) end
end
return 1
"""

SCRIPTS["take_expired"] = """
local ids = redis.call('ZRANGEBYSCORE', P .. 'expiring', '-inf', ARGV[2])
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local taken = {}
for i = 1, math.min(#ids, tonumber(ARGV[3])) do
  local key = P .. 'msg:' .. ids[i]
  table.insert(taken, queued_record(key, ids[i]))
  unqueue(ids[i])
  redis.call('DEL', key)
end
return taken
"""

SCRIPTS["dead_letter"] = """
local reason, now = ARGV[2], ARGV[3]
local moved = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = P .. 'msg:' .. id
  if redis.call('EXISTS', key) == 1 then
    table.insert(moved, queued_record(key, id))
    unqueue(id)
    local dead = P .. 'dead:' .. id
    redis.call('RENAME', key, dead)
    redis.call('HSET', dead, 'reason', reason, 'at', now)
    local owner = redis.call('HMGET', dead, 'device', 'user')
    redis.call('ZADD', P .. 'dead', id, id)
    redis.call('ZADD', P .. 'dead-device:' .. owner[1], id, id)
    redis.call('ZADD', P .. 'dead-user:' .. owner[2], id, id)
  end
end
return moved
"""

# ARGV: user ('' for any), device ('' for any), limit.
SCRIPTS["dead_letters"] = """
local user, device, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local index = P .. 'dead'
if device ~= '' then index = P .. 'dead-device:' .. device elseif user ~= '' then index = P .. 'dead-user:' .. user end
local letters, start = {}, 0
while #letters < limit do
  local ids = redis.call('ZRANGE', index, start, start + 255)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = P .. 'dead:' .. id
    local f = redis.call('HMGET', key, 'user', 'reason', 'at')
    if user == '' or f[1] == user then
      table.insert(letters, {queued_record(key, id), f[2], f[3]})
      if #letters >= limit then break end
    end
  end
  start = start + 256
end
return letters
"""

# ARGV: mode ('all', 'device' or 'ids'), device ('' for any), then ids for mode 'ids'.
SCRIPTS["redrive"] = """
local mode, device = ARGV[2], ARGV[3]
local candidates
if mode == 'all' then candidates = redis.call('ZRANGE', P .. 'dead', 0, -1)
elseif mode == 'device' then candidates = redis.call('ZRANGE', P .. 'dead-device:' .. device, 0, -1)
else candidates = {unpack(ARGV, 4)} end
local moved = {}
for _, id in ipairs(candidates) do
  local dead = P .. 'dead:' .. id
  local owner = redis.call('HMGET', dead, 'device', 'user')
  if owner[1] and (device == '' or owner[1] == device) then
    local key = P .. 'msg:' .. id
    redis.call('RENAME', dead, key)
    redis.call('HDEL', key, 'reason', 'at')
    redis.call('HSET', key, 'attempts', '0')
    redis.call('ZREM', P .. 'dead', id)
    redis.call('ZREM', P .. 'dead-device:' .. owner[1], id)
    redis.call('ZREM', P .. 'dead-user:' .. owner[2], id)
    queue(id)
    table.insert(moved, queued_record(key, id))
  end
end
return moved
"""

SCRIPTS["purge"] = """
local device = ARGV[2]
if ARGV[3] == '1' then
  local index = P .. 'dead-device:' .. device
  local ids = redis.call('ZRANGE', index, 0, -1)
  for _, id in ipairs(ids) do
    local key = P .. 'dead:' .. id
    local user = redis.call('HGET', key, 'user')
    if user then redis.call('ZREM', P .. 'dead-user:' .. user, id) end
    redis.call('ZREM', P .. 'dead', id)
    redis.call('DEL', key)
  end
  redis.call('DEL', index)
  return #ids
end
local inbox = P .. 'inbox:' .. device
local ids = redis.call('ZRANGE', inbox, 0, -1)
for _, id in ipairs(ids) do
  redis.call('DEL', P .. 'msg:' .. id)
  redis.call('ZREM', P .. 'expiring', id)
end
redis.call('DEL', inbox, P .. 'inbox-bytes:' .. device)
return #ids
"""

# ARGV: device, then packed receipts (all of one call's batch for this device).
SCRIPTS["add_receipts"] = """
for i = 2, #ARGV, 2 do
  redis.call('RPUSH', P .. 'receipts:' .. ARGV[i], ARGV[i + 1])
  redis.call('SADD', P .. 'receipts-waiting', ARGV[i])
end
return 1
"""

SCRIPTS["take_receipts"] = """
local key, limit = P .. 'receipts:' .. ARGV[2], tonumber(ARGV[3])
local taken = redis.call('LRANGE', key, 0, limit - 1)
if #taken > 0 then redis.call('LTRIM', key, limit, -1) end
if redis.call('EXISTS', key) == 0 then redis.call('SREM', P .. 'receipts-waiting', ARGV[2]) end
return taken
"""

# Returns {state version, doc fields (HGETALL), the user's byte total, the change log if ARGV[4] == '1'}.
SCRIPTS["state_read"] = """
local user, name = ARGV[2], ARGV[3]
local total = 0
for _, size in ipairs(redis.call('HVALS', ukey(user, 'docs'))) do total = total + tonumber(size) end
local log = {}
if ARGV[4] == '1' then log = redis.call('LRANGE', ukey(user, 'doc-log:' .. name), 0, -1) end
return {redis.call('GET', ukey(user, 'state-version')) or '0', redis.call('HGETALL', ukey(user, 'doc:' .. name)),
        num(total), log, holds_fence(user, ARGV[6], ARGV[5], ARGV[7]) and 1 or 0}
"""

# ARGV: user, name, expected version, rev, has value ('1'/'0'), value, size, by, updated, log entry, keep,
# fence task ('' for none), fence epoch. -1: the fence does not hold; 0: the version moved; 1: written.
SCRIPTS["state_commit"] = """
local user, name = ARGV[2], ARGV[3]
if not holds_fence(user, ARGV[13], ARGV[9], ARGV[14]) then return -1 end
if (redis.call('GET', ukey(user, 'state-version')) or '0') ~= ARGV[4] then return 0 end
local doc = ukey(user, 'doc:' .. name)
redis.call('HSET', doc, 'rev', ARGV[5], 'size', ARGV[8], 'by', ARGV[9], 'updated', ARGV[10])
if ARGV[6] == '1' then redis.call('HSET', doc, 'value', ARGV[7]) else redis.call('HDEL', doc, 'value') end
redis.call('HSET', ukey(user, 'docs'), name, ARGV[8])
local log = ukey(user, 'doc-log:' .. name)
local keep = tonumber(ARGV[12])
if keep > 0 then
  redis.call('RPUSH', log, ARGV[11])
  redis.call('LTRIM', log, -keep, -1)
else
  redis.call('DEL', log)
end
redis.call('INCR', ukey(user, 'state-version'))
return 1
"""

# ARGV: user, 'doc' or 'prefix', the name or prefix. Returns per document {name, HGETALL, change log}.
SCRIPTS["state_catch_up"] = """
local user, mode, wanted = ARGV[2], ARGV[3], ARGV[4]
local names = {}
if mode == 'doc' then
  names = {wanted}
else
  for _, name in ipairs(redis.call('HKEYS', ukey(user, 'docs'))) do
    if string.sub(name, 1, #wanted) == wanted then table.insert(names, name) end
  end
end
local out = {}
for _, name in ipairs(names) do
  table.insert(out, {name, redis.call('HGETALL', ukey(user, 'doc:' .. name)),
                     redis.call('LRANGE', ukey(user, 'doc-log:' .. name), 0, -1)})
end
return out
"""

# ARGV: user, name, rev, has value ('1'/'0'), value, size, by, updated, then the log entries oldest first.
SCRIPTS["state_restore"] = """
local user, name = ARGV[2], ARGV[3]
local doc = ukey(user, 'doc:' .. name)
redis.call('DEL', doc)
redis.call('HSET', doc, 'rev', ARGV[4], 'size', ARGV[7], 'by', ARGV[8], 'updated', ARGV[9])
if ARGV[5] == '1' then redis.call('HSET', doc, 'value', ARGV[6]) end
redis.call('HSET', ukey(user, 'docs'), name, ARGV[7])
local log = ukey(user, 'doc-log:' .. name)
redis.call('DEL', log)
if #ARGV >= 10 then redis.call('RPUSH', log, unpack(ARGV, 10)) end
redis.call('INCR', ukey(user, 'state-version'))
return 1
"""

SCRIPTS["changes_since"] = """
return redis.call('ZRANGEBYSCORE', P .. 'changes', '(' .. ARGV[2], '+inf', 'LIMIT', 0, ARGV[3])
"""

# ARGV: user, task, lease JSON, '1' if it has a handoff.
# ARGV: user, task, lease JSON, '1' if it holds a handoff, '1' to write only if the stored lease is ARGV[7]
# (the previous lease's JSON, '' for none). Returns 0 for an unknown user, -1 if the lease changed meanwhile.
SCRIPTS["put_task"] = """
local user, task = ARGV[2], ARGV[3]
if redis.call('HEXISTS', P .. 'users', user) == 0 then return 0 end
if ARGV[6] == '1' and (redis.call('HGET', ukey(user, 'tasks'), task) or '') ~= ARGV[7] then return -1 end
redis.call('HSET', ukey(user, 'tasks'), task, ARGV[4])
if ARGV[5] == '1' then redis.call('SADD', ukey(user, 'task-handoffs'), task)
else redis.call('SREM', ukey(user, 'task-handoffs'), task) end
if redis.call('SCARD', ukey(user, 'task-handoffs')) > 0 then redis.call('SADD', P .. 'task-notices', user)
else redis.call('SREM', P .. 'task-notices', user) end
return 1
"""

# ---- records <-> Redis values ------------------------------------------------------------------------

Reply = Any  # what redis-py hands back: bytes, ints, None and nested lists of them


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(flat: Sequence[bytes]) -> dict[str, bytes]:
    """An HGETALL reply as Lua returns it (a flat list) as a dict."""
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _optional_int(fields: Mapping[str, bytes], name: str) -> int | None:
    value = fields.get(name)
    return None if value is None else int(value)


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON: {exc}") from None


def _device_fields(device: DeviceRecord) -> list[Any]:
    rec = _json_text([device.type, device.name, device.platform, device.version, list(device.capabilities),
                      device.metadata], f"metadata of device {device.id!r}")
    fields: list[Any] = ["user", device.user, "created", device.created, "rec", rec, "status", device.status,
                         "last_seen", device.last_seen]
    if device.credential_hash is not None:
        fields += ["credential_hash", device.credential_hash]
    if device.revoked_at is not None:
        fields += ["revoked_at", device.revoked_at]
    return fields


def _device_record(device_id: str, fields: Mapping[str, bytes]) -> DeviceRecord:
    device_type, name, platform, version, capabilities, metadata = json.loads(fields["rec"])
    credential = fields.get("credential_hash")
    return DeviceRecord(id=device_id, user=_text(fields["user"]), type=device_type, name=name, platform=platform,
                        version=version, capabilities=tuple(capabilities), metadata=metadata,
                        created=int(fields["created"]), last_seen=int(fields["last_seen"]),
                        status=_text(fields["status"]),
                        credential_hash=None if credential is None else _text(credential),
                        revoked_at=_optional_int(fields, "revoked_at"))


SESSION_INTS = ("created", "expires_at", "next_seq", "last_activity", "connected_ms", "messages_in", "messages_out",
                "bytes_in", "bytes_out")
SESSION_OPTIONAL_INTS = ("connected_at", "disconnected_at", "revoked_at")


def _session_arguments(session: SessionRecord) -> list[Any]:
    fields: list[Any] = ["user", session.user, "device", session.device]
    for name in SESSION_INTS:
        fields += [name, int(getattr(session, name))]
    for name in SESSION_OPTIONAL_INTS:
        value = getattr(session, name)
        if value is not None:
            fields += [name, int(value)]
    if session.pending:
        fields += ["pending", msgpack.packb(
            [(m.seq, m.sender_user, m.sender_device, m.msg_id, bytes(m.frame), m.text) for m in session.pending],
            use_bin_type=True)]
    return [session.id, session.user, session.device, len(fields) // 2, *fields]


def _session_record(session_id: str, fields: Mapping[str, bytes]) -> SessionRecord:
    record = SessionRecord(id=session_id, user=_text(fields["user"]), device=_text(fields["device"]),
                           created=int(fields["created"]), expires_at=int(fields["expires_at"]))
    for name in SESSION_INTS[2:]:
        setattr(record, name, int(fields[name]))
    for name in SESSION_OPTIONAL_INTS:
        setattr(record, name, _optional_int(fields, name))
    pending = fields.get("pending")
    if pending is not None:
        record.pending = [
            PendingMessage(seq=seq, sender_user=sender_user, sender_device=sender_device, msg_id=msg_id, frame=frame,
                           text=text)
            for seq, sender_user, sender_device, msg_id, frame, text in msgpack.unpackb(pending, raw=False)
        ]
    return record


def _pairing_record(fields: Mapping[str, bytes]) -> PairingCode:
    issuer = fields.get("issuer_device")
    return PairingCode(id=_text(fields["id"]), secret_hash=_text(fields["secret_hash"]), user=_text(fields["user"]),
                       issuer_device=None if issuer is None else _text(issuer), created=int(fields["created"]),
                       expires_at=int(fields["expires_at"]), approve=fields["approve"] == b"1",
                       attempts=int(fields["attempts"]), used_at=_optional_int(fields, "used_at"))


def _queued_arguments(message: QueuedMessage) -> list[Any]:
    fields: list[Any] = [message.sender_device, message.msg_id, message.type, bytes(message.body), message.ts,
                         message.receipt]
    if message.work is not None:
        fields.append(message.work)  # (older nodes' blobs have six fields: read as no work)
    blob = msgpack.packb(fields, use_bin_type=True)
    return [message.device, message.user, message.priority, message.size,
            "" if message.expires_at is None else message.expires_at, message.attempts, blob]


def _lease_json(lease: TaskLease) -> str:
    """A lease as its hash value (also what ``put_task`` compares when it must be unchanged): its open handoff,
    if any, is a sixth element, so a handoff opening or moving on is a change another node's write sees."""
    fields: list[Any] = list(lease_fields(lease) or ())
    if lease.open_handoff is not None:
        fields.append([lease.open_handoff.id, lease.open_handoff.stage, lease.open_handoff.until])
    return json.dumps(fields)


def _id_key(msg_id: str | int) -> str:
    """A message id as a hash field: 1 and "1" are different ids."""
    return f"i{msg_id}" if isinstance(msg_id, int) else f"s{msg_id}"


def _queued_record(reply: Sequence[Any]) -> QueuedMessage:
    queued_id, device, user, priority, expires, attempts, blob = reply
    sender_device, msg_id, message_type, body, ts, receipt, *work = msgpack.unpackb(blob, raw=False)
    return QueuedMessage(device=_text(device), user=_text(user), sender_device=sender_device, msg_id=msg_id,
                         type=message_type, body=body, ts=ts, priority=int(priority),
                         expires_at=None if expires is None else int(expires), receipt=receipt,
                         attempts=int(attempts), id=int(queued_id), work=work[0] if work else None)


def _by_id(messages: list[QueuedMessage]) -> list[QueuedMessage]:
    messages.sort(key=lambda message: message.id)
    return messages


def _state_doc(user: str, name: str, fields: Mapping[str, bytes]) -> StateDoc:
    if not fields:
        return StateDoc(user=user, name=name)
    value = fields.get("value")
    return StateDoc(user=user, name=name, rev=int(fields["rev"]), value=None if value is None else json.loads(value),
                    by=_text(fields["by"]), updated=int(fields["updated"]))


def _log_entries(reply: Sequence[bytes]) -> list[tuple[int, str, str, str | None, int]]:
    """A document's change log: (rev, patch JSON, by, patch id JSON, at), oldest first."""
    return [tuple(json.loads(entry)) for entry in reply]


def _state_changes(user: str, name: str, log: list[tuple[int, str, str, str | None, int]],
                   after: int) -> list[StateChange]:
    return [StateChange(user=user, doc=name, rev=rev, prev_rev=rev - 1, patch=json.loads(patch), by=by,
                        patch_id=None if id_text is None else json.loads(id_text), at=at)
            for rev, patch, by, id_text, at in log if rev > after]


class _Command(NamedTuple):
    args: tuple[Any, ...]
    script: str | None  # the script an EVALSHA runs: loaded again if Redis answers NOSCRIPT
    reply: asyncio.Future[Any]


def _settle(reply: asyncio.Future[Any], outcome: Any) -> None:
    if reply.done():  # its caller was cancelled
        return
    if isinstance(outcome, BaseException):
        reply.set_exception(outcome)
    else:
        reply.set_result(outcome)


def _fail(commands: list[_Command], exc: BaseException, where: str) -> None:
    """Answer commands whose pipeline failed, as the callers expect: a RedisError (the wrapper of every store
    method turns it into StoreError), also for a socket error; a StoreError if sending was cancelled."""
    if isinstance(exc, (OSError, TimeoutError)):
        exc = RedisConnectionError(f"{type(exc).__name__}: {exc}")
    elif not isinstance(exc, RedisError):
        exc = StoreError(f"redis store {where}: sending was stopped ({exc!r})")
    for command in commands:
        _settle(command.reply, exc)


class RedisStore(Store):
    """The Store contract on one Redis server (see the module docstring). ``url``: redis://HOST:PORT/DB."""

    shared_by_nodes = True

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT) -> None:
        self.url = parse_redis_url(url)
        self.where = url_without_password(url)
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # see "Order" in the module docstring: commands not yet sent, and the task that sends them
        self._unsent: list[_Command] = []
        self._sender: asyncio.Task[None] | None = None

    # ---- plumbing ------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError(f"redis store {self.where} is not open")
        return self._client

    async def open(self) -> None:
        if self._client is not None:
            raise StoreError(f"redis store {self.where} is already open")
        client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.connect_timeout, socket_timeout=self.command_timeout,
            retry=Retry(NoBackoff(), 0),  # never send a command twice: see "Timeouts and retries"
            **_WITHOUT_MAINTENANCE_NOTIFICATIONS,
        )
        self._client = client
        self._scripts = {name: client.register_script(PRELUDE + body) for name, body in SCRIPTS.items()}
        version = await self._run("open", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            await self._disconnect()
            raise StoreError(f"redis store {self.where} has layout version {version}, but this rccs knows versions up "
                             f"to {SCHEMA_VERSION}: it was written by a newer rccs; upgrade rccs to use it")

    async def close(self) -> None:
        if self._sender is not None:  # what was asked before the close is sent first
            await asyncio.wait([self._sender])
        await self._disconnect()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _run(self, script: str, *args: Any) -> Reply:
        return await self._command("EVALSHA", self._scripts[script].sha, 0, self.prefix, *args, script=script)

    def _command(self, *args: Any, script: str | None = None) -> asyncio.Future[Any]:
        """Send one command (``script``: the name of the script an EVALSHA runs) in call order; its reply, with
        redis-py's usual conversion for the command, or its error."""
        if self._client is None:
            raise StoreError(f"redis store {self.where} is not open")
        reply = asyncio.get_running_loop().create_future()
        self._unsent.append(_Command(args, script, reply))
        if self._sender is None or self._sender.done():  # done: cancelled before it ever ran
            self._sender = asyncio.create_task(self._send_all())
        return reply

    async def _send_all(self) -> None:
        try:
            while self._unsent and self._client is not None:
                batch, self._unsent = self._unsent, []
                await self._send_batch(self._client, batch)
        finally:
            self._sender = None
            unsent, self._unsent = self._unsent, []
            problem = "is not open" if self._client is None else "stopped sending"  # closed, or cancelled
            for command in unsent:
                _settle(command.reply, StoreError(f"redis store {self.where} {problem}"))

    async def _send_batch(self, client: aioredis.Redis, batch: list[_Command]) -> None:
        try:
            replies = await self._pipelined(client, batch)
        except (RedisError, OSError, TimeoutError) as exc:
            _fail(batch, exc, self.where)
            return
        except BaseException as exc:  # cancelled: nobody may wait forever
            _fail(batch, exc, self.where)
            raise
        missing = {i for i, command in enumerate(batch)
                   if command.script is not None and isinstance(replies[i], NoScriptError)}
        for i, (command, reply) in enumerate(zip(batch, replies, strict=True)):
            if i not in missing:
                _settle(command.reply, reply)  # it ran (or failed on its own): answered whatever follows
        if not missing:
            return
        retry = [batch[i] for i in sorted(missing)]
        try:
            # Redis restarted or was flushed since the scripts were loaded. Every script is loaded again, not
            # only these: a later batch must not find some loaded and others not, or a call whose script is
            # missing would run after a later call's (retried after the rest of its batch).
            loading = client.pipeline(transaction=False)
            for script in self._scripts.values():
                loading.script_load(script.script)
            await loading.execute()
            again = await self._pipelined(client, retry)
        except (RedisError, OSError, TimeoutError) as exc:
            _fail(retry, exc, self.where)
            return
        except BaseException as exc:
            _fail(retry, exc, self.where)
            raise
        for command, reply in zip(retry, again, strict=True):
            _settle(command.reply, reply)

    @staticmethod
    async def _pipelined(client: aioredis.Redis, batch: list[_Command]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for command in batch:
            pipe.execute_command(*command.args)
        return list(await pipe.execute(raise_on_error=False))

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _user_key(self, user: str, name: str) -> str:
        return f"{self.prefix}{{{user}}}:{name}"

    async def _hashes(self, keys: Sequence[str]) -> list[dict[str, bytes]]:
        """HGETALL of each key, in one script (the records as of one moment)."""
        if not keys:
            return []
        replies: list[list[bytes]] = await self._run("read_hashes", *keys)
        return [_fields(reply) for reply in replies]

    # ---- users -------------------------------------------------------

    async def add_user(self, user: UserRecord) -> None:
        if not await self._run("add_user", user.id, user.created):
            raise AlreadyExists(f"user {user.id!r} already exists")

    async def register(self, users: Sequence[UserRecord], devices: Sequence[DeviceRecord]) -> None:
        # The contract's calls one by one cost a round trip each, and several nodes' hellos wait for this write:
        # all are asked for at once instead (one pipeline; users first, so each device finds its user).
        outcomes = await asyncio.gather(*(self.add_user(user) for user in users),
                                        *(self.put_device(device) for device in devices), return_exceptions=True)
        for outcome in outcomes[:len(users)]:
            if isinstance(outcome, BaseException) and not isinstance(outcome, AlreadyExists):
                raise outcome
        refusal = next((outcome for outcome in outcomes[len(users):] if isinstance(outcome, BaseException)), None)
        if refusal is not None:
            raise refusal

    async def get_user(self, user_id: str) -> UserRecord | None:
        created = await self._command("HGET", self._key("users"), user_id)
        return None if created is None else UserRecord(id=user_id, created=int(created))

    async def list_users(self) -> list[UserRecord]:
        users = await self._command("HGETALL", self._key("users"))
        return sorted((UserRecord(id=_text(user_id), created=int(created)) for user_id, created in users.items()),
                      key=lambda user: user.id)

    async def remove_user(self, user_id: str, now: int) -> bool:
        return bool(await self._run("remove_user", user_id, now))

    # ---- devices -----------------------------------------------------

    async def put_device(self, device: DeviceRecord) -> None:
        fields = _device_fields(device)  # before Redis: a bad record fails without a round trip
        outcome = _text(await self._run("put_device", device.id, device.user, device.credential_hash or "",
                                        int(device.revoked_at is not None), *fields))
        if outcome == "unknown user":
            raise DeviceRefused(f"cannot store device {device.id!r}: unknown user {device.user!r}")
        if outcome == "revoked":
            raise DeviceRefused(f"device {device.id!r} is revoked and cannot be replaced")
        if outcome == "credential taken":
            raise DeviceRefused(f"cannot store device {device.id!r}: its credential belongs to another device")

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        [fields] = await self._hashes([self._key(f"device:{device_id}")])
        return _device_record(device_id, fields) if fields else None

    async def list_devices(self, user_id: str | None = None, include_revoked: bool = False) -> list[DeviceRecord]:
        index = self._key("devices") if user_id is None else self._user_key(user_id, "devices")
        device_ids = sorted(_text(device_id) for device_id in await self._command("SMEMBERS", index))
        records = await self._hashes([self._key(f"device:{device_id}") for device_id in device_ids])
        devices = [_device_record(device_id, fields) for device_id, fields in zip(device_ids, records, strict=True)
                   if fields]
        chosen = [device for device in devices if (user_id is None or device.user == user_id)
                  and (include_revoked or device.revoked_at is None)]
        chosen.sort(key=lambda device: (device.user, device.created, device.id))
        return chosen

    async def find_device_by_credential(self, credential_hash: str) -> DeviceRecord | None:
        reply = await self._run("find_device_by_credential", credential_hash)
        if not reply:
            return None
        device_id, flat = reply
        fields = _fields(flat)
        if "revoked_at" in fields:
            return None  # a device put already revoked may still carry a credential; it must not sign anyone in
        return _device_record(_text(device_id), fields)

    async def revoke_device(self, device_id: str, now: int) -> bool:
        return bool(await self._run("revoke_device", device_id, now))

    async def update_presence(self, updates: Sequence[tuple[str, str, int]]) -> None:
        if updates:
            await self._run("update_presence", *(value for update in updates for value in update))

    # ---- sessions ----------------------------------------------------

    async def put_sessions(self, sessions: Sequence[SessionRecord]) -> None:
        if sessions:
            await self._run("put_sessions", *(value for session in sessions for value in _session_arguments(session)))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        [fields] = await self._hashes([self._key(f"session:{session_id}")])
        return _session_record(session_id, fields) if fields else None

    async def _sessions(self, index: str) -> list[SessionRecord]:
        session_ids = [_text(session_id) for session_id in await self._command("SMEMBERS", index)]
        records = await self._hashes([self._key(f"session:{session_id}") for session_id in session_ids])
        return [_session_record(session_id, fields)
                for session_id, fields in zip(session_ids, records, strict=True) if fields]

    async def list_sessions(self, user_id: str | None = None, device_id: str | None = None) -> list[SessionRecord]:
        if device_id is not None:
            index = self._key(f"device-sessions:{device_id}")
        elif user_id is not None:
            index = self._user_key(user_id, "sessions")
        else:
            index = self._key("sessions")
        chosen = [session for session in await self._sessions(index) if (user_id is None or session.user == user_id)
                  and (device_id is None or session.device == device_id)]
        chosen.sort(key=lambda session: (session.user, session.device, session.created, session.id))
        return chosen

    async def revoke_session(self, session_id: str, now: int) -> bool:
        return bool(await self._run("revoke_session", session_id, now))

    async def delete_stale_sessions(self, now: int, grace_ms: int) -> int:
        # A page of ids at a time, judged and deleted in Redis: every node runs this each minute, and reading
        # every session of the cluster (pending messages included) cost a node 0.35 s of CPU at 13,000 sessions,
        # with its other store commands waiting behind that one reply.
        deleted = 0
        cursor: Any = 0
        while True:
            cursor, page = await self._command("SSCAN", self._key("sessions"), cursor, "COUNT", STALE_SCAN_PAGE)
            if page:
                deleted += int(await self._run("delete_stale_sessions", now, grace_ms, *(_text(i) for i in page)))
            if int(cursor) == 0:
                return deleted

    async def reset_live_state(self, now: int) -> None:
        await self._run("reset_live_state", now)

    # ---- pairing -----------------------------------------------------

    async def add_pairing_code(self, code: PairingCode) -> None:
        fields: list[Any] = ["id", code.id, "secret_hash", code.secret_hash, "user", code.user, "created", code.created,
                             "expires_at", code.expires_at, "approve", int(code.approve), "attempts", code.attempts]
        if code.issuer_device is not None:
            fields += ["issuer_device", code.issuer_device]
        if code.used_at is not None:
            fields += ["used_at", code.used_at]
        if not await self._run("add_pairing_code", code.id, code.user, code.expires_at, *fields):
            raise AlreadyExists(f"pairing code {code.id!r} already exists")

    async def redeem_pairing_code(self, code_id: str, secret_hash: str, now: int,
                                  max_attempts: int) -> PairingCode | None:
        reply = await self._run("redeem_pairing_code", code_id, secret_hash, now, max_attempts)
        return _pairing_record(_fields(reply)) if reply else None

    async def delete_pairing_codes_before(self, cutoff: int) -> int:
        deleted: int = await self._run("delete_pairing_codes_before", cutoff)
        return deleted

    async def list_pairing_codes(self) -> list[PairingCode]:
        members: list[bytes] = await self._command("ZRANGE", self._key("pairing-expiry"), 0, -1)
        codes = sorted(_text(code) for code in members)
        records = await self._hashes([self._key(f"pairing:{code}") for code in codes])
        return [_pairing_record(fields) for fields in records if fields]

    # ---- durable inboxes ----------------------------------------------

    async def enqueue(self, messages: Sequence[QueuedMessage], max_count: int, max_bytes: int,
                      policy: str, ids: IdMemory | None = None) -> EnqueueOutcome:
        """Every message given ends up in ``stored``, ``rejected``, ``repeated`` or ``conflicting``.
        ``dropped`` may also list messages stored earlier in the same batch: a batch does what the same
        messages enqueued one call at a time would do. With ``ids``, the senders' message ids are checked
        and remembered here, in the same step (several nodes share them)."""
        check_policy(policy)
        outcome = EnqueueOutcome(stored=[], rejected=[], dropped=[])
        if not messages:
            return outcome
        copies = []
        arguments: list[Any] = []
        for index, message in enumerate(messages):
            copied = QueuedMessage(**{field: getattr(message, field) for field in QueuedMessage.__dataclass_fields__})
            copied.body = bytes(message.body)  # a bytearray or memoryview would stay shared with the caller
            copies.append(copied)
            arguments += _queued_arguments(copied)
            if ids is not None and ids.checked[index]:
                arguments += [message.sender_device, _id_key(message.msg_id),
                              hashlib.blake2b(copied.body, digest_size=12).hexdigest()]
            else:
                arguments += [message.sender_device, "", ""]
        checked = ids or IdMemory(now=0, window_ms=0, per_sender=0, checked=())
        queued_ids, dropped = await self._run("enqueue", max_count, max_bytes, int(policy == OVERFLOW_REJECT),
                                              checked.now, checked.window_ms, checked.per_sender, *arguments)
        for copied, queued_id in zip(copies, queued_ids, strict=True):
            if queued_id > 0:
                copied.id = int(queued_id)
                outcome.stored.append(copied)
            elif queued_id == ID_REPEATED:
                outcome.repeated.append(copied)
            elif queued_id == ID_CONFLICTING:
                outcome.conflicting.append(copied)
            else:
                outcome.rejected.append(copied)
        outcome.dropped = [_queued_record(reply) for reply in dropped]
        return outcome

    async def remember_sends(self, sends: Sequence[tuple[str, str, str | int, bytes]],
                             ids: IdMemory) -> list[str | None]:
        if not sends:
            return []
        arguments: list[Any] = []
        for user, sender, msg_id, body in sends:
            arguments += [user, sender, _id_key(msg_id), hashlib.blake2b(bytes(body), digest_size=12).hexdigest()]
        verdicts = await self._run("remember_sends", ids.now, ids.window_ms, ids.per_sender, *arguments)
        named = {0: None, ID_REPEATED: "duplicate", ID_CONFLICTING: "conflict"}
        return [named[int(verdict)] for verdict in verdicts]

    async def inbox(self, device_id: str, now: int, limit: int = 1000) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        return [_queued_record(reply) for reply in await self._run("inbox", device_id, now, limit)]

    async def inbox_size(self, device_id: str) -> tuple[int, int]:
        count, size = await self._run("inbox_size", device_id)
        return int(count), int(size)

    async def remove_queued(self, ids: Sequence[int]) -> list[QueuedMessage]:
        """The removed messages come back by id."""
        if not ids:
            return []
        return _by_id([_queued_record(reply) for reply in await self._run("remove_queued", *sorted(set(ids)))])

    async def count_attempts(self, ids: Sequence[int]) -> None:
        """An id given twice still counts one attempt."""
        if ids:
            await self._run("count_attempts", *sorted(set(ids)))

    async def take_expired(self, now: int, limit: int = 1000) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        return _by_id([_queued_record(reply) for reply in await self._run("take_expired", now, limit)])

    async def dead_letter(self, ids: Sequence[int], reason: str, now: int) -> list[QueuedMessage]:
        """The moved messages come back by id."""
        if not ids:
            return []
        return _by_id([_queued_record(reply)
                       for reply in await self._run("dead_letter", reason, now, *sorted(set(ids)))])

    async def dead_letters(self, user_id: str | None = None, device_id: str | None = None,
                           limit: int = 1000) -> list[DeadLetter]:
        if limit <= 0:
            return []
        reply = await self._run("dead_letters", user_id or "", device_id or "", limit)
        return [DeadLetter(message=_queued_record(message), reason=_text(reason), at=int(at))
                for message, reason, at in reply]

    async def redrive(self, ids: Sequence[int] | None = None, device_id: str | None = None) -> list[QueuedMessage]:
        """With both ``ids`` and ``device_id``, the dead letters among ``ids`` of that device. The
        messages come back by id."""
        if ids is not None and not ids:
            return []
        if ids is not None:
            reply = await self._run("redrive", "ids", device_id or "", *sorted(set(ids)))
        elif device_id is not None:
            reply = await self._run("redrive", "device", device_id)
        else:
            reply = await self._run("redrive", "all", "")
        return _by_id([_queued_record(message) for message in reply])

    async def purge(self, device_id: str, dead_letters: bool = False) -> int:
        purged: int = await self._run("purge", device_id, int(dead_letters))
        return purged

    # ---- receipts for offline senders ----------------------------------

    async def add_receipts(self, receipts: Sequence[tuple[str, dict[str, Any]]]) -> None:
        packed = [value for device_id, envelope in receipts
                  for value in (device_id, pack_receipt(device_id, envelope))]  # packed first: a bad one keeps none
        if packed:
            await self._run("add_receipts", *packed)

    async def take_receipts(self, device_id: str, limit: int = 10000) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return [unpack_receipt(envelope) for envelope in await self._run("take_receipts", device_id, limit)]

    async def devices_with_kept_receipts(self) -> list[str]:
        return sorted(_text(device) for device in await self._command("SMEMBERS", self._key("receipts-waiting")))

    async def kept_receipts(self, device_id: str) -> list[dict[str, Any]]:
        key = self._key(f"receipts:{device_id}")
        kept: list[bytes] = await self._command("LRANGE", key, 0, -1)
        return [unpack_receipt(envelope) for envelope in kept]

    # ---- idempotency keys --------------------------------------------

    async def save_message_ids(self, entries: Sequence[tuple[str, str | int, int, int]]) -> None:
        # Several nodes save theirs at their shutdowns: merged into one hash, never replacing each other's.
        if entries:
            fields = [part for device, msg_id, at, digest in entries
                      for part in (msgpack.packb([device, msg_id], use_bin_type=True), msgpack.packb([at, digest]))]
            await self._command("HSET", self._key("message-ids"), *fields)

    async def load_message_ids(self, since: int) -> list[tuple[str, str | int, int, int]]:
        key = self._key("message-ids")
        entries, expired = [], []
        for field, value in (await self._command("HGETALL", key)).items():
            at, digest = msgpack.unpackb(value)
            if at >= since:
                device, msg_id = msgpack.unpackb(field, raw=False)
                entries.append((device, msg_id, at, digest))
            else:
                expired.append(field)
        if expired:
            await self._command("HDEL", key, *expired)
        entries.sort(key=lambda entry: entry[2])
        return entries

    # ---- state documents -----------------------------------------------

    async def get_state(self, user_id: str, doc: str) -> StateDoc:
        [fields] = await self._hashes([self._user_key(user_id, f"doc:{doc}")])
        return _state_doc(user_id, doc, fields)

    async def patch_state(self, user_id: str, doc: str, patch: Any, by: str, patch_id: str | int | None,
                          if_rev: int | None, now: int, max_doc_bytes: int, max_user_bytes: int,
                          keep_changes: int, fence: tuple[str, int] | None = None) -> StatePatched:
        patch_text = state_patch_text(patch)
        id_text = None if patch_id is None else json.dumps(patch_id)
        patch_value = json.loads(patch_text)
        fence_task, fence_epoch = ("", "") if fence is None else (fence[0], str(fence[1]))
        for _attempt in range(STATE_PATCH_ATTEMPTS):
            version, doc_reply, user_bytes, log_reply, fence_holds = await self._run(
                "state_read", user_id, doc, int(id_text is not None), by, fence_task, fence_epoch)
            if not fence_holds:  # before anything else, as the other stores check it
                raise FenceMoved(f"{by!r} no longer holds task {fence_task!r} at epoch {fence_epoch}")
            fields = _fields(doc_reply)
            current = _state_doc(user_id, doc, fields)
            if fields and id_text is not None:
                for rev, text, change_by, change_id, _ in reversed(_log_entries(log_reply)):
                    if change_by == by and change_id == id_text and text == patch_text:
                        return StatePatched(doc=current, rev=rev, prev_rev=rev - 1, duplicate=True)
            current_size = int(fields.get("size", 0))
            planned = plan_state_patch(current, current_size, int(user_bytes), patch_value, if_rev, max_doc_bytes,
                                       max_user_bytes)
            if planned is None:
                return StatePatched(doc=current, rev=current.rev, prev_rev=current.rev, noop=True)
            merged, size = planned
            rev = current.rev + 1
            value = "" if merged is None else json.dumps(merged, ensure_ascii=False, allow_nan=False)
            entry = json.dumps([rev, patch_text, by, id_text, now], ensure_ascii=False)
            committed = await self._run("state_commit", user_id, doc, version, rev, int(merged is not None), value,
                                        size, by, now, entry, keep_changes, fence_task, fence_epoch)
            if committed == -1:
                raise FenceMoved(f"{by!r} no longer holds task {fence_task!r} at epoch {fence_epoch}")
            if committed:
                change = StateChange(user=user_id, doc=doc, rev=rev, prev_rev=rev - 1, patch=patch_value, by=by,
                                     patch_id=patch_id, at=now)
                stored = StateDoc(user=user_id, name=doc, rev=rev, value=merged, by=by, updated=now)
                return StatePatched(doc=stored, rev=rev, prev_rev=rev - 1, change=change)
        raise StoreError(f"state document {doc!r} of user {user_id!r} changed under {STATE_PATCH_ATTEMPTS} attempts "
                         "in a row to patch it; try again")

    async def list_state(self, user_id: str) -> list[tuple[StateDoc, list[StateChange]]]:
        # The catch-up script with an empty prefix reads every document the user's index names, tombstones too.
        reply = await self._run("state_catch_up", user_id, "prefix", "")
        listed = [(_state_doc(user_id, _text(name), _fields(doc_reply)),
                   _state_changes(user_id, _text(name), _log_entries(log_reply), 0))
                  for name, doc_reply, log_reply in reply]
        listed.sort(key=lambda item: item[0].name)
        return listed

    async def restore_state(self, doc: StateDoc, changes: Sequence[StateChange]) -> None:
        try:
            value = "" if doc.value is None else json.dumps(doc.value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"state document {doc.name!r} is not JSON: {exc}") from None
        entries = [json.dumps([change.rev, state_patch_text(change.patch), change.by,
                               None if change.patch_id is None else json.dumps(change.patch_id), change.at],
                              ensure_ascii=False) for change in changes]
        await self._run("state_restore", doc.user, doc.name, doc.rev, int(doc.value is not None), value,
                        json_size(doc.value), doc.by, doc.updated, *entries)

    async def state_catch_up(self, user_id: str, since: Mapping[str, int], doc: str | None = None,
                             prefix: str | None = None) -> list[StateCatchUp]:
        if doc is not None:
            reply = await self._run("state_catch_up", user_id, "doc", doc)
        else:
            reply = await self._run("state_catch_up", user_id, "prefix", prefix or "")
        caught: list[StateCatchUp] = []
        for raw_name, doc_reply, log_reply in reply:
            name = _text(raw_name)
            fields = _fields(doc_reply)
            current = _state_doc(user_id, name, fields)
            have = since.get(name)
            if doc is None and "value" not in fields and name not in since:
                continue  # a deleted document only for a caller that knows it
            if not fields:
                caught.append(StateCatchUp(doc=current, changes=[] if have == 0 else None))
                continue
            changes: list[StateChange] | None = None
            if have is not None and have <= current.rev:
                log = _log_entries(log_reply)
                oldest = log[0][0] if log else current.rev + 1
                if have == current.rev or oldest <= have + 1:
                    changes = _state_changes(user_id, name, log, have)
            caught.append(StateCatchUp(doc=current, changes=changes))
        caught.sort(key=lambda item: item.doc.name)
        return caught

    # ---- task leases -------------------------------------------------

    async def load_tasks(self, user_id: str) -> list[TaskLease]:
        leases = await self._command("HGETALL", self._user_key(user_id, "tasks"))
        loaded = []
        for task, packed in leases.items():
            owner, epoch, expires, handoff, updated, *open_handoff = json.loads(packed)
            loaded.append(TaskLease(user=user_id, task=_text(task), owner=owner, epoch=epoch, expires=expires,
                                    handoff=handoff, updated=updated,
                                    open_handoff=OpenHandoff(*open_handoff[0]) if open_handoff else None))
        loaded.sort(key=lambda lease: lease.task)
        return loaded

    async def users_with_task_notices(self) -> list[str]:
        return sorted(_text(user) for user in await self._command("SMEMBERS", self._key("task-notices")))

    async def put_task(self, lease: TaskLease, if_unchanged: bool = False, previous: TaskLease | None = None) -> None:
        written = await self._run("put_task", lease.user, lease.task, _lease_json(lease),
                                  int(lease.handoff is not None), int(if_unchanged),
                                  "" if previous is None else _lease_json(previous))
        if written == 0:
            raise StoreError(f"unknown user {lease.user!r}")
        if written == -1:
            raise TaskRaced(f"task {lease.task!r} of {lease.user!r} changed meanwhile")

    # ---- change feed -------------------------------------------------

    async def changes_since(self, cursor: int, limit: int = 1000) -> list[Change]:
        if limit <= 0:
            return []
        entries: list[bytes] = await self._run("changes_since", cursor, limit)
        changes = []
        for entry in entries:
            seq, kind, key = entry.decode().split(" ", 2)
            changes.append(Change(seq=int(seq), kind=kind, key=key))
        return changes

    async def last_change(self) -> int:
        seq = await self._command("GET", self._key("change-seq"))
        return 0 if seq is None else int(seq)

    async def token_secret(self) -> bytes:
        key = self._key("token-secret")
        await self._command("SET", key, secrets.token_hex(32), "NX")  # the first node's; never replaced
        secret = await self._command("GET", key)
        if secret is None or len(secret) < 32:
            raise StoreError(f"redis store {self.where} holds no usable token secret at {key!r}")
        return secret if isinstance(secret, bytes) else secret.encode()

    async def adopt_token_secret(self, secret: bytes) -> bytes:
        key = self._key("token-secret")
        await self._command("SET", key, secret, "NX")  # a secret the cluster has already is never replaced
        kept = await self._command("GET", key)
        if kept is None:
            raise StoreError(f"redis store {self.where} holds no token secret at {key!r} after setting it")
        return kept if isinstance(kept, bytes) else kept.encode()


def _surface_redis_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a store method so that a Redis failure reaches the caller as StoreError naming the server."""

    @functools.wraps(method)
    async def wrapped(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except RedisError as exc:
            raise StoreError(f"redis store {self.where}: {method.__name__} failed: "
                             f"{type(exc).__name__}: {exc}") from exc

    return wrapped


# Every public coroutine of the store, the Store contract, goes through the one translation above.
for _name, _method in list(vars(RedisStore).items()):
    if inspect.iscoroutinefunction(_method) and not _name.startswith("_"):
        setattr(RedisStore, _name, _surface_redis_errors(_method))
del _name, _method

# Keep the constants of the status names next to the Lua that spells them out.
assert (STATUS_ONLINE, STATUS_AWAY, STATUS_OFFLINE) == ("online", "away", "offline")
assert (CHANGE_USER, CHANGE_DEVICE, CHANGE_SESSION) == ("user", "device", "session")
