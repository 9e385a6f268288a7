-- Store::ban. ARGV[7]: 'x' exactly [8] ms, or 'd' doubling from base [8] ms up to cap [9] ms.
-- Returns {0} without an entry, else {1, remaining_ms, reindex}.
local floor, ceil = now_ms()
local found, reindex = open(floor)
if not found then
  return { 0 }
end
local strikes, until_ = field('bs'), field('bu')
if strikes > 0 and until_ + BAN_MEMORY <= floor then
  strikes = 0
end
strikes = strikes + 1
local length = tonumber(ARGV[8])
if ARGV[7] == 'd' then
  length = math.min(length * 2 ^ math.min(strikes - 1, 31), tonumber(ARGV[9]))
end
length = math.min(length, MAX_BAN)
until_ = math.max(until_, ceil + length)
redis.call('HSET', E, 'bs', strikes, 'bu', int(until_))
expire(floor)
publish('b', until_ - floor)
return { 1, until_ - floor, reindex }
