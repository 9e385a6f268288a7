-- Store::release (never creates). Returns {1} when a live lease was ended, else {0}.
local floor = now_ms()
local found = open(floor)
if not found then
  return { 0 }
end
redis.call('ZREMRANGEBYSCORE', L, '-inf', int(floor))
local popped = redis.call('ZPOPMIN', L)
expire(floor)
if popped[1] then
  return { 1 }
end
return { 0 }
