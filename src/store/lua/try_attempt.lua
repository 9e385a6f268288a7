-- Store::try_attempt: check the budget and count the attempt, the hand-out and the lease in one
-- step. ARGV[7]: connection type ('h' HTTP, 'w' WebSocket); [8]: '1' with a budget, '0' without;
-- [9]: attempts; [10]: window length (ms); [11]: lease (ms).
-- Returns {1, used, reindex} when admitted, {0, retry_after_ms, reindex} when the window is full.
local floor, ceil = now_ms()
local _, reindex = open(floor)
local window, budget_field = WW, 'wb'
if ARGV[7] == 'h' then
  window, budget_field = WH, 'hb'
end
local lease = tonumber(ARGV[11])
local result
if ARGV[8] ~= '1' then
  redis.call('DEL', window)
  redis.call('HDEL', E, budget_field)
  hand_out(floor, ceil, lease)
  result = { 1, 0 }
else
  local attempts, per = tonumber(ARGV[9]), tonumber(ARGV[10])
  redis.call('HSET', E, budget_field, ARGV[9] .. ':' .. ARGV[10])
  -- An attempt at `at` is in the window while at + per > now.
  redis.call('ZREMRANGEBYSCORE', window, '-inf', int(floor - per))
  local used = redis.call('ZCARD', window)
  if used > attempts then
    -- A budget lowered since the last attempt: only the newest `attempts` matter.
    redis.call('ZREMRANGEBYRANK', window, 0, used - attempts - 1)
    used = attempts
  end
  if used < attempts then
    local at = math.max(ceil, last_score(window) or 0)
    redis.call('ZADD', window, int(at), redis.call('HINCRBY', E, 'seq', 1))
    hand_out(floor, ceil, lease)
    result = { 1, used + 1 }
  else
    local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
    local retry = per
    if oldest[2] then
      retry = tonumber(oldest[2]) + per - floor
    end
    result = { 0, math.max(retry, 1) }
  end
end
expire(floor)
result[3] = reindex
return result
