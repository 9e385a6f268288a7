-- Prepended to the per-entry scripts (before common.lua) and to outage.lua by src/store/redis.rs.
-- now_ms(): the server's clock (TIME) plus ARGV[1], the clock offset in ms (0 in production; tests
-- move time with it), in whole milliseconds: rounded down ("has it passed") and up ("when it
-- happened").
local function now_ms()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  local floor = tonumber(t[1]) * 1000 + math.floor(us / 1000) + tonumber(ARGV[1])
  local ceil = floor
  if us % 1000 ~= 0 then
    ceil = floor + 1
  end
  return floor, ceil
end

