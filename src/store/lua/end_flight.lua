-- Store::end_flight. KEYS[1]: the flight lock. ARGV[1]: this broker's id (the lock's value),
-- [2]: the flights channel, [3]: the message ('origin key').
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
