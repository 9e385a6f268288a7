-- Store::record_success (never creates: ARGV[4] is '0'). Returns {found}.
local floor = now_ms()
local found = open(floor)
if not found then
  return { 0 }
end
redis.call('HSET', E, 'cf', 0)
expire(floor)
return { 1 }
