-- Spend `cost` calls from a fixed-window budget of `limit` per `window` seconds, unless that
-- would pass the limit. Returns {1 if allowed else 0, the count, seconds until the window ends}.
-- KEYS: counter
-- ARGV: limit window cost
local count = tonumber(redis.call('GET', counter) or '0')
local most, seconds, spend = tonumber(limit), tonumber(window), tonumber(cost)
if count + spend > most then
  local ttl = redis.call('TTL', counter)
  if ttl < 0 then ttl = seconds end
  return {0, count, ttl}
end
count = redis.call('INCRBY', counter, spend)
if count == spend then redis.call('EXPIRE', counter, seconds) end
return {1, count, redis.call('TTL', counter)}
