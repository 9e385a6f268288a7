-- Store::states / Store::list: one entry's snapshot, read only. Returns {0} without an entry,
-- else {1, url, exchange, banned_ms, strikes, penalised_ms, ejected_ms, ejections, failures,
-- live_leases, hand_outs, then per window (HTTP, WebSocket): present, attempts, per_ms, used,
-- frees_ms}; *_ms are remaining times, 0 when passed.
local floor = now_ms()
if redis.call('EXISTS', E) == 0 then
  return { 0 }
end
local function left(t)
  return math.max(t - floor, 0)
end
local reply = {
  1,
  redis.call('HGET', E, 'url') or '',
  redis.call('HGET', E, 'ex') or '',
  left(field('bu')),
  field('bs'),
  left(field('pu')),
  left(field('eu')),
  field('ej'),
  field('cf'),
  redis.call('ZCOUNT', L, '(' .. int(floor), '+inf'),
  field('ho'),
}
for _, w in ipairs({ { WH, 'hb' }, { WW, 'wb' } }) do
  local attempts, per = budget_of(w[2])
  if attempts then
    local since = '(' .. int(floor - per)
    local used = math.min(redis.call('ZCOUNT', w[1], since, '+inf'), attempts)
    local first = redis.call('ZRANGEBYSCORE', w[1], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local frees = 0
    if first[2] then
      frees = tonumber(first[2]) + per - floor
    end
    for _, v in ipairs({ 1, attempts, per, used, frees }) do
      reply[#reply + 1] = v
    end
  else
    for _, v in ipairs({ 0, 0, 0, 0, 0 }) do
      reply[#reply + 1] = v
    end
  end
end
return reply
