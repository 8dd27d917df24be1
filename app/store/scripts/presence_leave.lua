-- A device's socket closed: forget it, unless another process holds it by now.
-- KEYS: presence
-- ARGV: device process
if redis.call('HGET', presence, device) == process then
  return redis.call('HDEL', presence, device)
end
return 0
