-- Store::record_failure. Returns {0} without an entry, else {1, consecutive, reindex}.
local floor = now_ms()
local found, reindex = open(floor)
if not found then
  return { 0 }
end
local count = field('cf')
if field('lf') + FAILURE_MEMORY <= floor then
  count = 0
end
count = count + 1
redis.call('HSET', E, 'cf', count, 'lf', int(floor))
expire(floor)
return { 1, count, reindex }
