-- End a pending approval as expired if its deadline has passed. Returns {its status now
-- ('gone' when it is no more), '1' when this call ended it}.
-- KEYS: approval acks waiters deadlines pending fatigue
-- ARGV: id user_id now keep backoff_schedule user_channel reason
-- include: app.approval/finalize
local found = redis.call('HMGET', approval, 'user_id', 'status', 'expires_at')
if not found[1] then
  redis.call('ZREM', deadlines, id)
  return {'gone', ''}
end
if found[1] ~= user_id then return {'gone', ''} end
if found[2] ~= 'pending' then return {found[2], ''} end
if tonumber(found[3]) > tonumber(now) then return {'pending', ''} end
finalize({approval = approval, acks = acks, waiters = waiters, deadlines = deadlines,
  pending = pending, fatigue = fatigue}, id, 'expired', now, '', reason, keep, backoff_schedule,
  user_channel)
return {'expired', '1'}
