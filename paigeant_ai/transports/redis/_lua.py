"""The Lua scripts of the Redis transport and its consumers.

Each settles or moves entries atomically, so several workers can share a stream without locks: a message is
never both handed back and acknowledged, and a delayed message moves into its stream exactly once. A plain ack is
an `XACK`, no script.

Stream entries have the fields `body` and `headers` (a JSON object), and `fresh` (below). How often an entry
was delivered comes from Redis alone, never from the entry: the consumer group's own delivery counter of the
entry (in its pending entries list), plus, for an entry the transport itself re-added after unacknowledged
deliveries (`retry_later`, a consumer handing back what it held, a delayed retry coming due), the deliveries
before, kept in the hash `<stream>@deliveries` (entry id -> count), which these scripts alone write. A publisher
can add any field to an entry with `XADD`, so a count in the entry would let anyone who can publish make a replay
look redelivered (a worker then skips or takes it over instead of refusing it) or poisoned (dead-lettered with a
harmless-looking reason). The hash loses an entry's count when the entry is trimmed. An entry these scripts add
with no deliveries before has the field `fresh` (exactly those the hash has no count for), so that a consumer
woken by a blocking `XREADGROUP` asks the hash only about entries without it. The field spares a lookup and never
lowers a count: a publisher's own entry, with or without it, has a new id, which the hash has no count for.
Delayed messages are members of a sorted set, scored by the server time in milliseconds when they are due, and
packed as
`<32 hex id><10 digits deliveries><10 digits headers length><headers><body>`; the transport's `publish` always
packs 0 deliveries.

On a Redis Cluster a script may touch the keys of one hash slot only. Each script here touches one owner's keys
(`_layout.py`), which share a tag: PUBLISH (streams and marker: one address per call on a cluster, see
`_pipeline.py`), READ, PROMOTE, TRIM, RETRY, GIVE_BACK, CLAIM, RENEW, PENDING (an address's stream, its
`@deliveries` hash and its delayed set), BEAT and WATCH (its consumers), RELEASE, CLAIM_HOP, RENEW_HOP and
SETTLE_HOP (one key each), REMOVE_PARKED (a workflow's parked step). DEAD_LETTER moves an entry from an address's
stream to `dead-letter`, two owners: on a cluster the transport copies, then acknowledges, instead. MANY runs
quick commands on any keys: it is not used on a cluster.
"""

from __future__ import annotations

__all__ = (
    "BEAT",
    "CLAIM",
    "CLAIM_HOP",
    "DEAD_LETTER",
    "GIVE_BACK",
    "MANY",
    "PENDING",
    "PROMOTE",
    "PUBLISH",
    "PUBLISH_LATER",
    "READ",
    "RELEASE",
    "REMOVE_PARKED",
    "RENEW",
    "RENEW_HOP",
    "RETRY",
    "SETTLE_HOP",
    "TRIM",
    "WATCH",
)

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function field_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

local function append(stream, body, headers, deliveries, maxlen)
  local args = {'XADD', stream}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  args[#args + 1] = 'body'
  args[#args + 1] = body
  args[#args + 1] = 'headers'
  args[#args + 1] = headers
  if deliveries == 0 then
    args[#args + 1] = 'fresh'
    args[#args + 1] = '1'
  end
  local id = redis.call(unpack(args))
  if deliveries > 0 then redis.call('HSET', stream .. '@deliveries', id, deliveries) end
  return id
end

-- How often the entry `id` of `stream` was delivered before it was (re-)added: 0 unless these scripts re-added it.
local function before(stream, id)
  return tonumber(redis.call('HGET', stream .. '@deliveries', id)) or 0
end

local function pack(uid, deliveries, headers, body)
  return uid .. string.format('%010d%010d', deliveries, #headers) .. headers .. body
end

local function group_info(stream, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local m = field_map(g)
    if m['name'] == group then return m end
  end
  return nil
end

-- Trim the oldest settled entries while the stream is longer than maxlen, at most 10,000 of them a call (the
-- next call goes on). Settled means delivered to the group and acknowledged: older than the oldest pending entry
-- and not after the last delivered one. Entries still pending or not yet delivered are never trimmed, so the
-- stream may stay longer while they wait.
local function trim(stream, group, maxlen)
  local len = redis.call('XLEN', stream)
  if len <= maxlen then return 0 end
  local info = group_info(stream, group)
  if info == nil or info['last-delivered-id'] == '0-0' then return 0 end
  local upper = info['last-delivered-id']
  local summary = redis.call('XPENDING', stream, group)
  if summary[1] > 0 then upper = '(' .. summary[2] end
  local settled = redis.call('XRANGE', stream, '-', upper, 'COUNT', math.min(len - maxlen, 10000))
  if #settled == 0 then return 0 end
  for first = 1, #settled, 1000 do  -- the counts of re-added entries go with them (unpack takes a few thousand)
    local ids = {}
    for i = first, math.min(first + 999, #settled) do ids[#ids + 1] = settled[i][1] end
    redis.call('HDEL', stream .. '@deliveries', unpack(ids))
  end
  local after = redis.call('XRANGE', stream, '(' .. settled[#settled][1], '+', 'COUNT', 1)
  if #after == 0 then return redis.call('XTRIM', stream, 'MAXLEN', 0) end
  return redis.call('XTRIM', stream, 'MINID', after[1][1])
end

-- Acknowledge one entry; 1 if it was pending (a number), 0 if not or if the group is gone.
local function settle(stream, group, id)
  local acked = redis.pcall('XACK', stream, group, id)
  if type(acked) ~= 'number' then return 0 end
  return acked
end
"""

PUBLISH = (
    _COMMON
    + """
-- KEYS: the stream of each message, then this call's marker. ARGV: the body, headers and max length (0 for none)
-- of each message in turn, then the marker's lifetime in ms.
-- Returns {outcome, error}: the outcome has one character per message, 1 if it was added, 0 if Redis refused it
-- (the first refusal's reason is the error).
-- redis-py sends a pipeline again when the connection drops before the replies. If Redis had run this call, the
-- marker is there and holds the outcome: nothing is added twice, since a second identical entry would reach the
-- next worker as a replay.
local marker = KEYS[#KEYS]
local done = redis.call('GET', marker)
if done then return {done, 'refused on an earlier attempt'} end
local outcome, first_error = {}, ''
for i = 1, #KEYS - 1 do
  local n = 3 * (i - 1)
  local ok, err = pcall(append, KEYS[i], ARGV[n + 1], ARGV[n + 2], 0, tonumber(ARGV[n + 3]))
  outcome[i] = ok and '1' or '0'
  if not ok and first_error == '' then first_error = type(err) == 'table' and err.err or tostring(err) end
end
outcome = table.concat(outcome)
redis.call('SET', marker, outcome, 'PX', ARGV[#ARGV])
return {outcome, first_error}
"""
)

READ = (
    _COMMON
    + """
-- KEYS: stream. ARGV: group, consumer, most entries.
-- Reads new entries for the consumer, as one string: for each entry
-- `<id> <deliveries before> <headers length> <body length>\\n<headers><body>`. One string parses much faster
-- in redis-py than an entry's nested replies.
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not r then return '' end
local out = {}
for _, e in ipairs(r[1][2]) do
  local f = field_map(e[2])
  local body, headers = f['body'] or '', f['headers'] or '{}'
  out[#out + 1] = string.format('%s %d %d %d\\n', e[1], before(KEYS[1], e[1]), #headers, #body)
  out[#out + 1] = headers
  out[#out + 1] = body
end
return table.concat(out)
"""
)

MANY = """
-- ARGV: commands, each as its number of words then its words. Returns each command's reply, or its error.
-- Quick commands from many callers sent as one script call: Redis parses one command and redis-py one reply.
local replies, i = {}, 1
while i <= #ARGV do
  local words = tonumber(ARGV[i])
  replies[#replies + 1] = redis.pcall(unpack(ARGV, i + 1, i + words))
  i = i + words + 1
end
return replies
"""

PUBLISH_LATER = (
    _COMMON
    + """
-- KEYS: delayed set. ARGV: delay in ms, packed member.
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[1]), ARGV[2])
return 1
"""
)

PROMOTE = (
    _COMMON
    + """
-- KEYS: delayed set, stream. ARGV: most members to move.
-- Moves the due members into the stream; returns ms until the next one is due, or -1 if none is waiting.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local hlen = tonumber(string.sub(m, 43, 52))
  append(KEYS[2], string.sub(m, 53 + hlen), string.sub(m, 53, 52 + hlen), tonumber(string.sub(m, 33, 42)), 0)
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"""
)

TRIM = (
    _COMMON
    + """
-- KEYS: stream. ARGV: group, trim length. Returns how many entries went.
return trim(KEYS[1], ARGV[1], tonumber(ARGV[2]))
"""
)

RETRY = (
    _COMMON
    + """
-- KEYS: stream, delayed set. ARGV: group, entry id, delay in ms, deliveries so far, unique id, consumer.
-- Only the consumer that holds the entry hands it back: one whose lease lapsed must not take it from the consumer
-- that claimed it since (its copy, added again, would be a redelivery that takes the running hop over).
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(held) ~= 'table' or held.err or #held == 0 or held[1][2] ~= ARGV[6] then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if settle(KEYS[1], ARGV[1], ARGV[2]) == 0 or #entry == 0 then return 0 end
local f = field_map(entry[1][2])
local body, headers = f['body'] or '', f['headers'] or '{}'
local delay = tonumber(ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now_ms() + delay, pack(ARGV[5], tonumber(ARGV[4]), headers, body))
else
  append(KEYS[1], body, headers, tonumber(ARGV[4]), 0)
end
return 1
"""
)

DEAD_LETTER = (
    _COMMON
    + """
-- KEYS: stream, dead-letter stream. ARGV: group, entry id, body, headers JSON, length cap of dead-letter.
if settle(KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
append(KEYS[2], ARGV[3], ARGV[4], 0, tonumber(ARGV[5]))
return 1
"""
)

GIVE_BACK = (
    _COMMON
    + """
-- KEYS: stream. ARGV: group, consumer, trim length, then the ids it read but never handed out.
-- Re-adds every entry the consumer holds at the end of the stream, so any consumer takes it at once, and
-- acknowledges the original; then forgets the consumer.
local skip = {}
for i = 4, #ARGV do skip[ARGV[i]] = true end
local moved = 0
while true do
  local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 100, ARGV[2])
  if type(held) ~= 'table' or held.err or #held == 0 then break end
  for _, p in ipairs(held) do
    local id, times = p[1], p[4]
    if skip[id] then times = times - 1 end
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    if #entry > 0 then
      local f = field_map(entry[1][2])
      local deliveries = before(KEYS[1], id) + times
      append(KEYS[1], f['body'] or '', f['headers'] or '{}', deliveries, 0)
      moved = moved + 1
    end
  end
end
redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
trim(KEYS[1], ARGV[1], tonumber(ARGV[3]))
return moved
"""
)

CLAIM = (
    _COMMON
    + """
-- KEYS: stream. ARGV: group, consumer, visibility timeout in ms, cursor, most entries, forget-after in ms.
-- Claims entries other consumers left idle past the visibility timeout, with their delivery counts (all of them:
-- the group's and those before the entry was re-added), and
-- forgets consumers that hold nothing and have been silent for forget-after ms.
local r = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if type(r) ~= 'table' or r.err then return {'0-0', {}} end
local claimed = {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local times = 1
    if #p > 0 then times = p[1][4] end
    claimed[#claimed + 1] = {e[1], e[2], times + before(KEYS[1], e[1])}
  end
end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local m = field_map(c)
  if m['pending'] == 0 and m['idle'] > tonumber(ARGV[6]) and m['name'] ~= ARGV[2] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], m['name'])
  end
end
return {r[1], claimed}
"""
)

RENEW = (
    _COMMON
    + """
-- KEYS: stream. ARGV: group, consumer, entry ids.
-- Resets the idle time of the given entries this consumer still holds (its lease); returns those ids.
local mine = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if type(p) == 'table' and not p.err and #p > 0 and p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] end
end
if #mine > 0 then
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(mine) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return mine
"""
)

PENDING = (
    _COMMON
    + """
-- KEYS: stream, delayed set. ARGV: group. Messages not yet settled: undelivered, unacknowledged and delayed.
local total = redis.call('ZCARD', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return total end
local info = group_info(KEYS[1], ARGV[1])
if info == nil then return total + redis.call('XLEN', KEYS[1]) end
local lag = info['lag']
if type(lag) ~= 'number' then
  -- Redis cannot tell (entries were deleted in the middle): count them, up to a bound.
  lag = #redis.call('XRANGE', KEYS[1], '(' .. info['last-delivered-id'], '+', 'COUNT', 100000)
end
return total + info['pending'] + lag
"""
)

BEAT = """
-- KEYS: the consumers of an address. ARGV: consumer, 1 if it closes, ms to remember a heartbeat.
-- Scores the consumer with the time now, in Redis's clock (negated once it closed); forgets old heartbeats.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kept = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2] == '1' and -now or now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], kept - now, now - kept)
redis.call('PEXPIRE', KEYS[1], kept)
return 1
"""

WATCH = """
-- KEYS: the consumers of an address. ARGV: ms within which a heartbeat makes a consumer live.
-- Returns {live consumers, ms since a consumer was last seen, or -1 if none was}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live, last = 0, -1
local scored = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 2, #scored, 2 do
  local seen = tonumber(scored[i])
  if seen > now - tonumber(ARGV[1]) then live = live + 1 end
  last = math.max(last, math.abs(seen))
end
if last < 0 then return {live, -1} end
return {live, math.max(0, now - last)}
"""

RELEASE = """
-- KEYS: a claim. ARGV: the value of the claim to release.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

REMOVE_PARKED = """
-- KEYS: a parked workflow. ARGV: its message id.
-- Removes it if it is still the same parking (a newer one is kept).
if redis.call('HGET', KEYS[1], 'message_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_HOP_ENTRY = """
-- A hop's replay entry: `<r|h|s> <lease end ms> <digest> <holder>`: running, running and renewed by a worker that
-- handed its delivery back (no redelivery takes it over before its lease ends), or settled; `holder` is the random
-- token of the copy that holds the claim (an entry without one is read with none).
local function read_entry(raw)
  local state, lease_end, digest, holder = string.match(raw, '^(%a) (%d+) (%S+) ?(%S*)$')
  return state, tonumber(lease_end), digest, holder
end
"""

CLAIM_HOP = (
    _COMMON
    + _HOP_ENTRY
    + """
-- KEYS: the replay entry of a hop. ARGV: its digest, 1 if the broker redelivered it, lease ms, ttl ms, holder.
-- Returns claimed, running, settled or duplicate (see `paigeant_ai._replay`): a fresh copy of a running or settled
-- hop is a replay; the holder's own claim, asked again, is claimed.
local now = now_ms()
local raw = redis.call('GET', KEYS[1])
local running = 'r ' .. (now + tonumber(ARGV[3])) .. ' ' .. ARGV[1] .. ' ' .. ARGV[5]
if not raw then
  redis.call('SET', KEYS[1], running, 'PX', ARGV[4])
  return 'claimed'
end
local state, lease_end, digest, holder = read_entry(raw)
if digest ~= ARGV[1] then return 'duplicate' end
if state == 's' then return 'settled' end
-- This very claim, sent again: redis-py resends a pipeline whose replies a dropped connection lost.
if ARGV[5] ~= '-' and holder == ARGV[5] then return 'claimed' end
if (ARGV[2] == '1' and state == 'r') or lease_end < now then
  redis.call('SET', KEYS[1], running, 'KEEPTTL')
  return 'claimed'
end
return 'running'
"""
)

RENEW_HOP = (
    _COMMON
    + _HOP_ENTRY
    + """
-- KEYS: the replay entry of a hop. ARGV: its digest, lease ms, holder. Extends the lease of the hop's running claim
-- to now + lease; returns 1 if it did, 0 if the entry is settled, gone or another hop's, -1 if another holds it.
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local state, lease_end, digest, holder = read_entry(raw)
if state == 's' or digest ~= ARGV[1] then return 0 end
if holder ~= ARGV[3] then return -1 end
redis.call('SET', KEYS[1], 'h ' .. (now_ms() + tonumber(ARGV[2])) .. ' ' .. digest .. ' ' .. holder, 'KEEPTTL')
return 1
"""
)

SETTLE_HOP = (
    _HOP_ENTRY
    + """
-- KEYS: the replay entry of a hop. ARGV: its digest, ttl ms. Marks the hop settled, unless another hop holds the id.
local raw = redis.call('GET', KEYS[1])
if raw then
  local _, _, digest = read_entry(raw)
  if digest ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], 's 0 ' .. ARGV[1], 'PX', ARGV[2])
return 1
"""
)
