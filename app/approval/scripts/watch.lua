-- The approval's fields ({} when unknown); while it is pending, `inbox` (the calling
-- process's channel) is registered to hear of its end from the same atomic step.
-- KEYS: approval waiters
-- ARGV: inbox
local fields = redis.call('HGETALL', approval)
if #fields > 0 and redis.call('HGET', approval, 'status') == 'pending' then
  redis.call('SADD', waiters, inbox)
  redis.call('EXPIRE', waiters, redis.call('TTL', approval))
end
return fields
