-- Take up to `limit` due jobs under a lease ending at `lease_until`: jobs whose lease ran
-- out (their worker died) are due again first. Returns {id, body, id, body, ...}.
-- KEYS: due leased data
-- ARGV: now lease_until limit
local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', leased, id)
  redis.call('ZADD', due, now, id)
end
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(limit))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', due, id)
  local body = redis.call('HGET', data, id)
  if body then
    redis.call('ZADD', leased, lease_until, id)
    out[#out + 1] = id
    out[#out + 1] = body
  end
end
return out
