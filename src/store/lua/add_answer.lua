-- Store::add_answer. KEYS (one hash tag, the answer key's): [1] the ends (sorted set: proxy
-- digest -> end, server ms), [2] the answers (hash: proxy digest -> bytes).
-- ARGV: [1] clock offset in ms (0 in production; tests move time with it), [2] proxy digest,
-- [3] bytes, [4] ttl ms, [5] most answers, [6] most bytes.
-- Returns the number of answers kept.
local Z, H = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local function int(x)
  return string.format('%d', x)
end
local function drop(m)
  redis.call('HDEL', H, m)
  redis.call('ZREM', Z, m)
end
-- Expired answers go.
for _, m in ipairs(redis.call('ZRANGEBYSCORE', Z, '-inf', int(now))) do
  drop(m)
end
redis.call('ZADD', Z, int(now + tonumber(ARGV[4])), ARGV[2])
redis.call('HSET', H, ARGV[2], ARGV[3])
-- The bounds: the soonest-ending go first, never the one just added.
local most, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local members = redis.call('ZRANGE', Z, 0, -1)
local count, total = #members, 0
for _, m in ipairs(members) do
  total = total + redis.call('HSTRLEN', H, m)
end
for _, m in ipairs(members) do
  if count <= most and total <= budget then
    break
  end
  if m ~= ARGV[2] then
    total = total - redis.call('HSTRLEN', H, m)
    count = count - 1
    drop(m)
  end
end
-- Both keys live as long as the longest-lived answer, plus a second.
local last = redis.call('ZRANGE', Z, -1, -1, 'WITHSCORES')
local ttl = int(tonumber(last[2]) - now + 1000)
redis.call('PEXPIRE', Z, ttl)
redis.call('PEXPIRE', H, ttl)
return count
