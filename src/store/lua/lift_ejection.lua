-- Store::lift_ejection (never creates). Returns {1} when an ejection was running, else {0}.
local floor = now_ms()
local found = open(floor)
if not found or field('eu') <= floor then
  return { 0 }
end
redis.call('HSET', E, 'eu', int(floor), 'ej', math.max(field('ej') - 1, 0))
expire(floor)
publish('l', 0)
return { 1 }
