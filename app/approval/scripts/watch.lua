-- The approval's fields ({} when unknown); while it is pending, `inbox` (the calling
-- process's channel) is registered to hear of its end from the same atomic step.
-- KEYS: approval waiters
-- ARGV: inbox
local fields = redis.call('HGETALL', approval)
local status = nil
for i = 1, #fields, 2 do
  if fields[i] == 'status' then status = fields[i + 1] end
end
if status == 'pending' then
  redis.call('SADD', waiters, inbox)
  redis.call('EXPIRE', waiters, redis.call('TTL', approval))
end
return fields
