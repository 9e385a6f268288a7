-- Prepended to every per-entry script by src/store/redis.rs (after the constants it defines:
-- BAN_MEMORY, EJECTION_MEMORY, FAILURE_MEMORY, REINDEX_AFTER, MAX_LEASES, MIN_TTL, MAX_BAN).
--
-- KEYS: the four keys of one (proxy, exchange) entry, all under one hash tag:
--   [1] the entry hash, [2] the HTTP window, [3] the WebSocket window, [4] the leases.
-- ARGV: [1] clock offset in ms (0 in production; tests move time with it), [2] proxy URL,
--   [3] exchange, [4] create ('1' or '0'), [5] change channel, [6] origin (this broker's id),
--   [7..] the operation's own arguments.
-- Times are whole milliseconds of the server's clock (TIME), rounded like the memory store:
-- down for "has it passed", up for "when it happened".
-- now_ms() comes from clock.lua, prepended before this file.
local E, WH, WW, L = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function field(name)
  return tonumber(redis.call('HGET', E, name)) or 0
end

local function int(x)
  return string.format('%d', x)
end

-- The budget a window was last counted against ('attempts:per_ms'), or nil.
local function budget_of(name)
  local b = redis.call('HGET', E, name)
  if not b then
    return nil, nil
  end
  local attempts, per = string.match(b, '^(%d+):(%d+)$')
  return tonumber(attempts), tonumber(per)
end

local function last_score(key)
  local r = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if r[2] then
    return tonumber(r[2])
  end
  return nil
end

-- Whether the entry exists (creating it when asked), and whether the listing index should
-- (re)learn it: on creation, and again every REINDEX_AFTER, so the index outlives no entry and
-- no live entry outlives its index entry.
local function open(floor)
  if redis.call('EXISTS', E) == 0 then
    if ARGV[4] ~= '1' then
      return false, 0
    end
    redis.call('HSET', E, 'url', ARGV[2], 'ex', ARGV[3])
  end
  if field('ix') + REINDEX_AFTER <= floor then
    redis.call('HSET', E, 'ix', int(floor))
    return true, 1
  end
  return true, 0
end

-- Every key of the entry lives until the entry is idle (the memory store's rule: windows empty,
-- leases ended, penalty passed, a day after the last ban, 300 s after the last ejection, an hour
-- after the last failure), plus MIN_TTL.
local function expire(floor)
  local idle = floor
  local function later(t)
    if t and t > idle then
      idle = t
    end
  end
  later(last_score(L))
  later(field('pu'))
  if field('bs') > 0 then
    later(field('bu') + BAN_MEMORY)
  end
  if field('ej') > 0 then
    later(field('eu') + EJECTION_MEMORY)
  end
  if field('cf') > 0 then
    later(field('lf') + FAILURE_MEMORY)
  end
  for _, w in ipairs({ { WH, 'hb' }, { WW, 'wb' } }) do
    local _, per = budget_of(w[2])
    local last = last_score(w[1])
    if per and last then
      later(last + per)
    end
  end
  local ttl = int(idle - floor + MIN_TTL)
  for _, k in ipairs(KEYS) do
    redis.call('PEXPIRE', k, ttl)
  end
end

-- Announces a change to every broker: 'origin kind remaining_ms exchange url'.
local function publish(kind, remaining)
  redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. kind .. ' ' .. int(remaining) .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
end

-- One hand-out: counted, and a lease of `lease` ms (at most MAX_LEASES live; the soonest-ending
-- goes first).
local function hand_out(floor, ceil, lease)
  redis.call('HINCRBY', E, 'ho', 1)
  redis.call('ZREMRANGEBYSCORE', L, '-inf', int(floor))
  if redis.call('ZCARD', L) >= MAX_LEASES then
    redis.call('ZPOPMIN', L)
  end
  redis.call('ZADD', L, int(ceil + lease), redis.call('HINCRBY', E, 'seq', 1))
end
