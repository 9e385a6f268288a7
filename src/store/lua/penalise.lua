-- Store::penalise. ARGV[7]: length (ms). Returns {0} without an entry, else
-- {1, remaining_ms, reindex}.
local floor, ceil = now_ms()
local found, reindex = open(floor)
if not found then
  return { 0 }
end
local until_ = math.max(field('pu'), ceil + math.min(tonumber(ARGV[7]), MAX_BAN))
redis.call('HSET', E, 'pu', int(until_))
expire(floor)
publish('p', until_ - floor)
return { 1, until_ - floor, reindex }
