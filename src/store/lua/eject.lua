-- Store::eject. ARGV[7]: EJECTION_BASE (ms), [8]: EJECTION_MAX (ms). Returns {0} without an
-- entry, else {1, remaining_ms, reindex}.
local floor, ceil = now_ms()
local found, reindex = open(floor)
if not found then
  return { 0 }
end
local ejections = field('ej') + 1
local length = math.min(tonumber(ARGV[7]) * ejections, tonumber(ARGV[8]))
local until_ = math.max(field('eu'), ceil + length)
redis.call('HSET', E, 'ej', ejections, 'eu', int(until_), 'cf', 0)
expire(floor)
publish('e', until_ - floor)
return { 1, until_ - floor, reindex }
