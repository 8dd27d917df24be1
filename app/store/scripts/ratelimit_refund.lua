-- Give one call back to a budget: never below zero, and never reviving an expired window.
-- KEYS: counter
-- ARGV:
local count = tonumber(redis.call('GET', counter) or '0')
if count > 0 then return redis.call('DECR', counter) end
return 0
