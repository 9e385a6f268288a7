-- Store::outage_report, Store::outage_note_ejection and Store::outages (one exchange): the
-- exchange-outage guard of src/brokering/outage.rs on the server, so that every replica's reports
-- count and one of them starts the outage.
--
-- KEYS, all under the exchange's hash tag: [1] reporters (zset: proxy digest -> time of its
--   latest report), [2] the failing ones (the same, for proxies whose latest report was a plain
--   failure), [3] ejections (zset: proxy URL -> when ejected), [4] the outage's start (ms),
--   [5] the "index me" marker.
-- clock.lua (now_ms) is prepended. ARGV: [1] clock offset in ms (0 in production), [2] operation ('r' report, 'j' note an
--   ejection, 's' status), [3] window (ms), [4] min proxies, [5] failing fraction, [6] most
--   reporters, [7] most ejections, [8] the proxy's digest ('r') or URL ('j'), [9] '1' when the
--   report is a failure ('r').
-- Returns {transition (0 none, 1 started, 2 ended), in outage (0/1), outage age in ms (-1: none),
--   reporters, failing, index (0/1: add the exchange to the listing index), lifted URLs...}.
local R, F, J, S, I = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local floor, ceil = now_ms()
local op, window = ARGV[2], math.max(tonumber(ARGV[3]), 1)
local min_proxies, fraction = math.max(tonumber(ARGV[4]), 1), tonumber(ARGV[5])
local function int(x)
  return string.format('%d', x)
end

-- A report (or ejection) at `at` counts while at + window > now.
local cutoff = int(floor - window)
redis.call('ZREMRANGEBYSCORE', R, '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', F, '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', J, '-inf', cutoff)

local function holds()
  local reporters = redis.call('ZCARD', R)
  local failing = redis.call('ZCARD', F)
  return reporters >= min_proxies and failing > fraction * reporters, reporters, failing
end

local function keep(key)
  if redis.call('EXISTS', key) == 1 then
    redis.call('PEXPIRE', key, window + 1000)
  end
end

local started = redis.call('GET', S)
local since = started and tonumber(started)
local now_in, reporters, failing = holds()
local transition, index, lifted = 0, 0, {}

if op == 'r' then
  local d = ARGV[8]
  if redis.call('ZSCORE', R, d) or reporters < tonumber(ARGV[6]) then
    redis.call('ZADD', R, ceil, d)
    if ARGV[9] == '1' then
      redis.call('ZADD', F, ceil, d)
    else
      redis.call('ZREM', F, d)
    end
    now_in, reporters, failing = holds()
  end
  if not since and now_in then
    since = ceil
    redis.call('SET', S, int(ceil))
    lifted = redis.call('ZRANGE', J, 0, -1)
    redis.call('DEL', J)
    transition = 1
  elseif since and not now_in then
    since = nil
    redis.call('DEL', S)
    transition = 2
  end
  if redis.call('SET', I, '1', 'NX', 'PX', math.max(math.floor(window / 2), 1)) then
    index = 1
  end
  keep(R)
  keep(F)
  keep(S)
elseif op == 'j' then
  if since and now_in then
    return { 0, 1, math.max(floor - since, 0), reporters, failing, 0 }
  end
  redis.call('ZADD', J, ceil, ARGV[8])
  local n = redis.call('ZCARD', J)
  local most = tonumber(ARGV[7])
  if n > most then
    redis.call('ZREMRANGEBYRANK', J, 0, n - most - 1)
  end
  keep(J)
end

local age = -1
if since and now_in then
  age = math.max(floor - since, 0)
end
local reply = { transition, (age >= 0) and 1 or 0, age, reporters, failing, index }
for _, url in ipairs(lifted) do
  reply[#reply + 1] = url
end
return reply
