-- Store::get_answer. KEYS[1]: the answer. Returns nil, or {bytes, remaining_ms}.
local bytes = redis.call('GET', KEYS[1])
if not bytes then
  return nil
end
return { bytes, redis.call('PTTL', KEYS[1]) }
