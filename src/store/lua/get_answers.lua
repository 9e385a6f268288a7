-- Store::get_answers. KEYS: as add_answer.lua. ARGV[1]: clock offset in ms.
-- Returns {bytes, remaining_ms, bytes, remaining_ms, ...}, longest-lived first.
local Z, H = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local live = redis.call('ZREVRANGEBYSCORE', Z, '+inf', '(' .. string.format('%d', now), 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local bytes = redis.call('HGET', H, live[i])
  if bytes then
    out[#out + 1] = bytes
    out[#out + 1] = tonumber(live[i + 1]) - now
  end
end
return out
