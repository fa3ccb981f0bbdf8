"""The Lua scripts: every multi-step change is one script, so Redis applies it atomically.

Numbers that end up in keys, fields or ids go through ``string.format('%d')``: Lua 5.1 would
otherwise print large integers in exponent form.
"""

from __future__ import annotations

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# The failure record of a message: first and last failure (seconds, kept as text so no
# precision is lost), the last error's type and text, and the delivery count it failed at.
_NOTE_FAILURE = """
local function note_failure(key, field, now_s, has_error, etype, emsg, count)
  local old = redis.call('HGET', key, field)
  local record
  if old then record = cjson.decode(old) else record = {f = now_s, t = '', m = ''} end
  record.l = now_s
  if has_error == '1' then record.t = etype; record.m = emsg end
  record.c = count
  local text = cjson.encode(record)
  redis.call('HSET', key, field, text)
  return text
end
"""

# NATS subject matching, for queue-group registrations (patterns) against a subject.
_MATCH = """
local function tokens(s)
  local t = {}
  for token in string.gmatch(s, '[^.]+') do t[#t + 1] = token end
  return t
end

local function matches(pattern, subject)
  local p = tokens(pattern)
  for i = 1, #p do
    local token = p[i]
    if token == '>' then return #subject >= i end
    if i > #subject or (token ~= '*' and token ~= subject[i]) then return false end
  end
  return #p == #subject
end

-- One member of every queue group whose pattern matches gets the frame, picked by the clock's
-- microseconds (no state to keep). A member whose channel has no listener is gone: forget it
-- and try the next one.
local function to_queues(registry, channel_prefix, subject, frame)
  local registrations = redis.call('HGETALL', registry)
  local subject_tokens = tokens(subject)
  local groups = {}
  for i = 1, #registrations, 2 do
    local member, spec = registrations[i], registrations[i + 1]
    local newline = string.find(spec, '\\n', 1, true)
    if newline and matches(string.sub(spec, newline + 1), subject_tokens) then
      local group = groups[spec]
      if not group then group = {}; groups[spec] = group end
      group[#group + 1] = member
    end
  end
  local delivered = 0
  local usec = tonumber(redis.call('TIME')[2])
  for _, members in pairs(groups) do
    table.sort(members)
    local count = #members
    for j = 0, count - 1 do
      local member = members[(usec + j) % count + 1]
      if redis.call('PUBLISH', channel_prefix .. member, frame) > 0 then
        delivered = delivered + 1
        break
      end
      redis.call('HDEL', registry, member)
    end
  end
  return delivered
end
"""

# KEYS: registry version, partition stream, stream meta, dedup key, queue registry
# ARGV: 1 version routed with, 2 partition ('' = not stored), 3 max entries per partition,
# 4 max age ms, 5 dedup window ms ('' = no msg id), 6 core channel ('' = no core delivery),
# 7 subject, 8 core frame head, 9 payload, 10 trim mode ('~' or '='), 11 queue channel
# prefix, 12.. extra entry fields (name, value, ...)
# Returns {status, partition, offset, receivers}: status 0 stored (or core only), 1 duplicate,
# -1 the routing table changed (reload it and publish again).
PUBLISH = (
    _NOW
    + _MATCH
    + """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return {-1, 0, 0, 0} end
local partition, offset = -1, -1
if ARGV[2] ~= '' then
  if ARGV[5] ~= '' then
    local seen = redis.call('GET', KEYS[4])
    if seen then
      local sep = string.find(seen, ':', 1, true)
      return {1, tonumber(string.sub(seen, 1, sep - 1)), tonumber(string.sub(seen, sep + 1)), 0}
    end
  end
  partition = tonumber(ARGV[2])
  offset = redis.call('HINCRBY', KEYS[3], 'n:' .. ARGV[2], 1) - 1
  local text = string.format('%d', offset)
  local cmd = {'XADD', KEYS[2]}
  if ARGV[3] ~= '' then
    cmd[#cmd + 1] = 'MAXLEN'; cmd[#cmd + 1] = ARGV[10]; cmd[#cmd + 1] = ARGV[3]
  end
  cmd[#cmd + 1] = '*'
  cmd[#cmd + 1] = 'o'; cmd[#cmd + 1] = text
  cmd[#cmd + 1] = 's'; cmd[#cmd + 1] = ARGV[7]
  cmd[#cmd + 1] = 'p'; cmd[#cmd + 1] = ARGV[9]
  for i = 12, #ARGV do cmd[#cmd + 1] = ARGV[i] end
  redis.call(unpack(cmd))
  if ARGV[4] ~= '' then
    redis.call('XTRIM', KEYS[2], 'MINID', ARGV[10], string.format('%d', now_ms() - tonumber(ARGV[4])))
  end
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[4], ARGV[2] .. ':' .. text, 'PX', ARGV[5])
  end
end
local receivers = 0
if ARGV[6] ~= '' then
  local frame = ARGV[8] .. ARGV[9]
  receivers = redis.call('PUBLISH', ARGV[6], frame)
  if redis.call('EXISTS', KEYS[5]) == 1 then
    receivers = receivers + to_queues(KEYS[5], ARGV[11], ARGV[7], frame)
  end
end
return {0, partition, offset, receivers}
"""
)

# -- shared groups -------------------------------------------------------------------------------

# Whether ``consumer`` still holds the lease on ``id`` it got at delivery ``count``: an expired
# lease taken over (even by the same member) has a higher count.
_OWNS = """
local function owns(key, group, consumer, id, count)
  local info = redis.call('XPENDING', key, group, id, id, 1)
  return info[1] ~= nil and info[1][2] == consumer and info[1][4] == tonumber(count)
end
"""

# KEYS: 1 delayed zset, 2 failures hash, 3.. partition streams
# ARGV: 1 group, 2 consumer, 3 room, 4 ack wait ms, 5 max ack pending, 6 first partition,
# 7.. XAUTOCLAIM cursor per partition
# Returns {entries (partition, id, count, fields, ...), cursors, fresh room left, ms until
# the next delayed message is due (-1: none)}.
FETCH_SHARED = (
    _NOW
    + """
local group, consumer = ARGV[1], ARGV[2]
local room = tonumber(ARGV[3])
local max_pending = tonumber(ARGV[5])
local first = tonumber(ARGV[6])
local n = #KEYS - 2
local now = now_ms()
local out = {}
local got = 0
local function emit(p, id, count, fields)
  out[#out + 1] = p; out[#out + 1] = id; out[#out + 1] = count; out[#out + 1] = fields
  got = got + 1
end

-- 1. nacked messages whose delay is over: back into the PEL with their count carried on
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room)
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local sep = string.find(member, '|', 1, true)
  local p = tonumber(string.sub(member, 1, sep - 1))
  local id = string.sub(member, sep + 1)
  local count = 1
  local record = redis.call('HGET', KEYS[2], member)
  if record then count = cjson.decode(record).c or 1 end
  local claimed = redis.call('XCLAIM', KEYS[3 + p], group, consumer, 0, id, 'FORCE', 'RETRYCOUNT', count + 1)
  local entry = claimed[1]
  if entry and entry[2] then emit(p, id, count + 1, entry[2]) else redis.call('HDEL', KEYS[2], member) end
end

-- 2. expired leases (idle for ack wait): XAUTOCLAIM counts the new delivery
local cursors = {}
for i = 0, n - 1 do
  local p = (first + i) % n
  local key = KEYS[3 + p]
  local cursor = ARGV[7 + p]
  if got < room then
    local r = redis.call('XAUTOCLAIM', key, group, consumer, ARGV[4], cursor, 'COUNT', room - got)
    cursor = r[1]
    for _, entry in ipairs(r[2]) do
      if entry and entry[2] then
        local info = redis.call('XPENDING', key, group, entry[1], entry[1], 1)
        emit(p, entry[1], info[1][4], entry[2])
      end
    end
    if r[3] then
      for _, id in ipairs(r[3]) do redis.call('HDEL', KEYS[2], p .. '|' .. id) end
    end
  end
  cursors[p + 1] = cursor
end

-- 3. new messages, within max ack pending (the PELs plus the delayed)
local fresh = room - got
if fresh > 0 then
  local pending = redis.call('ZCARD', KEYS[1])
  for p = 0, n - 1 do pending = pending + redis.call('XPENDING', KEYS[3 + p], group)[1] end
  fresh = math.min(fresh, max_pending - pending)
  for i = 0, n - 1 do
    if fresh <= 0 then break end
    local p = (first + i) % n
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', fresh, 'STREAMS', KEYS[3 + p], '>')
    if r then
      for _, entry in ipairs(r[1][2]) do
        emit(p, entry[1], 1, entry[2])
        fresh = fresh - 1
      end
    end
  end
end

local wait = -1
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if head[1] then wait = math.max(0, tonumber(head[2]) - now) end
return {out, cursors, math.max(fresh, 0), wait}
"""
)

# KEYS: 1 partition stream, 2 failures hash
# ARGV: 1 group, 2 consumer, 3 id, 4 count, 5 failure field
ACK_SHARED = (
    _OWNS
    + """
if not owns(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[5])
return 1
"""
)

# A failed delivery (nack or term): note the failure, then either wait in the delayed zset
# (out of the PEL) or, when giving up, answer 2 with the failure record and leave the entry
# pending: the caller dead-letters it, then acks it (a crash between the two redelivers it,
# and the dead letter's id makes the second copy a duplicate).
# KEYS: 1 partition stream, 2 delayed zset, 3 failures hash
# ARGV: 1 group, 2 consumer, 3 id, 4 count, 5 member "<p>|<id>", 6 delay ms, 7 now (s),
# 8 has error, 9 error type, 10 error text, 11 give up ('1'), 12 max deliver ('0': none)
FAIL_SHARED = (
    _NOW
    + _OWNS
    + _NOTE_FAILURE
    + """
if not owns(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return {0, ''} end
local count = tonumber(ARGV[4])
local record = note_failure(KEYS[3], ARGV[5], ARGV[7], ARGV[8], ARGV[9], ARGV[10], count)
local max_deliver = tonumber(ARGV[12])
if ARGV[11] == '1' or (max_deliver > 0 and count >= max_deliver) then return {2, record} end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[6]), ARGV[5])
return {1, record}
"""
)

# in_progress: XCLAIM to the holder itself resets the idle time; JUSTID keeps the count.
# KEYS: 1 partition stream; ARGV: 1 group, 2 consumer, 3 id, 4 count
TOUCH_SHARED = (
    _OWNS
    + """
if not owns(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
)

# A member leaves: its pending entries move to the pseudo-consumer ``released`` already idle
# for ``ack wait`` (so the next XAUTOCLAIM of any member takes them at once), without counting
# a delivery (JUSTID); then the member's consumer record is deleted.
# KEYS: partition streams; ARGV: 1 group, 2 consumer, 3 released, 4 idle ms
RELEASE = """
for _, key in ipairs(KEYS) do
  for _ = 1, 10000 do
    local batch = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 100, ARGV[2])
    if type(batch) ~= 'table' or batch.err or #batch == 0 then break end
    local cmd = {'XCLAIM', key, ARGV[1], ARGV[3], 0}
    for _, info in ipairs(batch) do cmd[#cmd + 1] = info[1] end
    cmd[#cmd + 1] = 'IDLE'; cmd[#cmd + 1] = ARGV[4]; cmd[#cmd + 1] = 'JUSTID'
    redis.call(unpack(cmd))
  end
  redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
end
return 1
"""

# -- ordered groups ------------------------------------------------------------------------------

# Membership, partition locks and reading, in one round trip. The member refreshes its
# session, drops expired members, and computes its share: with the live members sorted, member
# i owns the partitions p with p % members == i (members beyond the partition count idle). It
# takes free partitions of its share (SET NX PX), renews the locks it holds, and reports
# partitions it holds outside its share (state 2: hand them over once their batch is settled).
# Then, on each owned partition without an outstanding batch and not paused, it reads a batch:
# the partition's pending entries first, in id order (a rewind after a nack, or what a failed
# member left), then new ones; so the partition's order holds across failures.
# KEYS: 1 members zset, 2 the stream's groups hash, then per partition: lock, pause, stream
# ARGV: 1 group, 2 token, 3 session ms, 4 room (0: no reading), 5 acquire ('1'), 6 first
# partition, 7 released pseudo-consumer, 8.. per partition: '1' = has an outstanding batch
# Returns {states per partition (0 not mine, 1 mine, 2 mine to hand over, 3 mine but paused by
# a delayed nack), entries, ms until the first pause ends (-1: none)}
SYNC_ORDERED = (
    _NOW
    + """
local group, token, released = ARGV[1], ARGV[2], ARGV[7]
local session = tonumber(ARGV[3])
local room = tonumber(ARGV[4])
local first = tonumber(ARGV[6])
-- The group (or its stream) was deleted: do not recreate the session key.
if redis.call('HEXISTS', KEYS[2], group) == 0 then return redis.error_reply('NOGROUP the group is gone') end
local now = now_ms()
redis.call('ZADD', KEYS[1], now + session, token)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now))
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(names)
local index, members = 0, #names
for i, name in ipairs(names) do if name == token then index = i - 1 end end
local n = (#KEYS - 2) / 3
local states, out = {}, {}
local got, wait = 0, -1

local function read_batch(p, key, limit)
  local taken = 0
  local pending = redis.call('XPENDING', key, group, '-', '+', limit)
  local previous = {}
  for i, info in ipairs(pending) do
    local id, owner, count = info[1], info[2], info[4]
    -- The first pending entry of a member that failed is the one it was processing: count it.
    if i == 1 and owner ~= token and owner ~= released then count = count + 1 end
    local claimed = redis.call('XCLAIM', key, group, token, 0, id, 'RETRYCOUNT', count)
    local entry = claimed[1]
    if entry and entry[2] then
      out[#out + 1] = p; out[#out + 1] = id; out[#out + 1] = count; out[#out + 1] = entry[2]
      taken = taken + 1
    end
    if owner ~= token then previous[owner] = true end
  end
  if #pending < limit then
    local r = redis.call('XREADGROUP', 'GROUP', group, token, 'COUNT', limit - taken, 'STREAMS', key, '>')
    if r then
      for _, entry in ipairs(r[1][2]) do
        out[#out + 1] = p; out[#out + 1] = entry[1]; out[#out + 1] = 1; out[#out + 1] = entry[2]
        taken = taken + 1
      end
    end
  end
  for owner in pairs(previous) do
    if #redis.call('XPENDING', key, group, '-', '+', 1, owner) == 0 then
      redis.call('XGROUP', 'DELCONSUMER', key, group, owner)
    end
  end
  return taken
end

for i = 0, n - 1 do
  local p = (first + i) % n
  local lock, pause, key = KEYS[3 + 3 * p], KEYS[4 + 3 * p], KEYS[5 + 3 * p]
  local share = (p % members) == index
  local holder = redis.call('GET', lock)
  local state = 0
  if holder == token then
    redis.call('PEXPIRE', lock, session)
    if share then state = 1 else state = 2 end
  elseif (not holder) and share and ARGV[5] == '1' then
    redis.call('SET', lock, token, 'PX', session)
    state = 1
  end
  if state == 1 then
    local ttl = redis.call('PTTL', pause)
    if ttl > 0 then
      state = 3
      if wait < 0 or ttl < wait then wait = ttl end
    elseif got < room and ARGV[8 + p] ~= '1' then
      got = got + read_batch(p, key, room - got)
    end
  end
  states[p + 1] = state
end
return {states, out, wait}
"""
)

# Commit: XACK what was acknowledged, only while the member holds the partition.
# KEYS: 1 lock, 2 stream, 3 failures; ARGV: 1 group, 2 token, 3 partition, 4.. ids
COMMIT_ORDERED = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if #ARGV >= 4 then
  local ack = {'XACK', KEYS[2], ARGV[1]}
  local forget = {'HDEL', KEYS[3]}
  for i = 4, #ARGV do
    ack[#ack + 1] = ARGV[i]
    forget[#forget + 1] = ARGV[3] .. '|' .. ARGV[i]
  end
  redis.call(unpack(ack))
  redis.call(unpack(forget))
end
return 1
"""

# A nack: commit the settled prefix of the batch, count the failed delivery on the nacked entry
# (RETRYCOUNT, JUSTID: it stays pending, first in line), note the failure, and pause the
# partition for the delay. The next batch re-reads the pending entries in order.
# KEYS: 1 lock, 2 stream, 3 failures, 4 pause
# ARGV: 1 group, 2 token, 3 partition, 4 nacked id, 5 its next count, 6 delay ms, 7 now (s),
# 8 has error, 9 error type, 10 error text, 11.. settled prefix ids
REWIND_ORDERED = (
    _NOTE_FAILURE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if #ARGV >= 11 then
  local ack = {'XACK', KEYS[2], ARGV[1]}
  local forget = {'HDEL', KEYS[3]}
  for i = 11, #ARGV do
    ack[#ack + 1] = ARGV[i]
    forget[#forget + 1] = ARGV[3] .. '|' .. ARGV[i]
  end
  redis.call(unpack(ack))
  redis.call(unpack(forget))
end
note_failure(KEYS[3], ARGV[3] .. '|' .. ARGV[4], ARGV[7], ARGV[8], ARGV[9], ARGV[10], tonumber(ARGV[5]) - 1)
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[4], 'RETRYCOUNT', ARGV[5], 'JUSTID')
if tonumber(ARGV[6]) > 0 then redis.call('SET', KEYS[4], '1', 'PX', ARGV[6]) end
return 1
"""
)

# Note a failure of a message the ordered member gives up on (term, max deliver).
# KEYS: 1 lock, 2 failures; ARGV: 1 token, 2 field, 3 now (s), 4 has error, 5 type, 6 text, 7 count
NOTE_ORDERED = (
    _NOTE_FAILURE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
return note_failure(KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
"""
)

# Hand a partition over: unlock it and move what the member still has pending to the
# ``released`` pseudo-consumer (the next owner redelivers it without counting a failure).
# KEYS: 1 lock, 2 stream; ARGV: 1 group, 2 token, 3 released
RELEASE_ORDERED = """
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
for _ = 1, 10000 do
  local batch = redis.pcall('XPENDING', KEYS[2], ARGV[1], '-', '+', 100, ARGV[2])
  if type(batch) ~= 'table' or batch.err or #batch == 0 then break end
  local cmd = {'XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0}
  for _, info in ipairs(batch) do cmd[#cmd + 1] = info[1] end
  cmd[#cmd + 1] = 'JUSTID'
  redis.call(unpack(cmd))
end
redis.pcall('XGROUP', 'DELCONSUMER', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: 1 members zset; ARGV: 1 token
LEAVE_ORDERED = """
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# -- observing -----------------------------------------------------------------------------------

# Per partition: {head, committed, next undelivered, in PEL, delayed, lock holder}.
# committed is the lowest offset not finished: the oldest pending or delayed entry, else the
# first never delivered.
# KEYS: 1 meta, 2 delayed zset, then per partition: stream, lock; ARGV: 1 group
LAG = """
local group = ARGV[1]
local n = (#KEYS - 2) / 2
local function offset_of(fields)
  for i = 1, #fields, 2 do if fields[i] == 'o' then return tonumber(fields[i + 1]) end end
  return nil
end
local function first_offset_from(key, start)
  local e = redis.call('XRANGE', key, start, '+', 'COUNT', 1)
  if e[1] then return offset_of(e[1][2]) end
  return nil
end
local waiting, lowest = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local sep = string.find(member, '|', 1, true)
  local p = tonumber(string.sub(member, 1, sep - 1))
  local id = string.sub(member, sep + 1)
  waiting[p + 1] = (waiting[p + 1] or 0) + 1
  local offset = first_offset_from(KEYS[3 + 2 * p], id)
  if offset and (lowest[p + 1] == nil or offset < lowest[p + 1]) then lowest[p + 1] = offset end
end
local out = {}
for p = 0, n - 1 do
  local key, lock = KEYS[3 + 2 * p], KEYS[4 + 2 * p]
  local head = tonumber(redis.call('HGET', KEYS[1], 'n:' .. p) or '0')
  local last, in_pel = nil, 0
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then last = fields['last-delivered-id']; in_pel = fields['pending'] end
  end
  if last == nil then return redis.error_reply('NOGROUP no group ' .. group) end
  local next_offset = first_offset_from(key, '(' .. last) or head
  local committed = next_offset
  if in_pel > 0 then
    local oldest = first_offset_from(key, redis.call('XPENDING', key, group)[2])
    if oldest and oldest < committed then committed = oldest end
  end
  if lowest[p + 1] and lowest[p + 1] < committed then committed = lowest[p + 1] end
  out[p + 1] = {head, committed, next_offset, in_pel, waiting[p + 1] or 0, redis.call('GET', lock) or ''}
end
return out
"""

# Age retention is applied on publish; a stream nobody publishes to is trimmed when observed.
# KEYS: 1 meta, 2.. partition streams; ARGV: 1 max age ms ('' none), 2 trim mode
# Returns {length, next offset} per partition.
STATE = (
    _NOW
    + """
local out = {}
for i = 2, #KEYS do
  if ARGV[1] ~= '' then
    redis.call('XTRIM', KEYS[i], 'MINID', ARGV[2], string.format('%d', now_ms() - tonumber(ARGV[1])))
  end
  out[#out + 1] = {redis.call('XLEN', KEYS[i]), tonumber(redis.call('HGET', KEYS[1], 'n:' .. (i - 2)) or '0')}
end
return out
"""
)

SCRIPTS = {
    "publish": PUBLISH,
    "fetch_shared": FETCH_SHARED,
    "ack_shared": ACK_SHARED,
    "fail_shared": FAIL_SHARED,
    "touch_shared": TOUCH_SHARED,
    "release": RELEASE,
    "sync_ordered": SYNC_ORDERED,
    "commit_ordered": COMMIT_ORDERED,
    "rewind_ordered": REWIND_ORDERED,
    "note_ordered": NOTE_ORDERED,
    "release_ordered": RELEASE_ORDERED,
    "leave_ordered": LEAVE_ORDERED,
    "lag": LAG,
    "state": STATE,
}
