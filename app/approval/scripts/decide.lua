-- End a pending approval with an answer, exactly once, whoever races. The caller read it
-- first: the owner and challenge it read must still be the stored ones, else nothing
-- happens ('not_found'). Already ended: {'final', its status}. Past its deadline: it ends
-- here as expired (`timeout_reason`), {'final', 'expired'}. Else it ends with `status` and
-- `reason`,
-- `audit_line` is appended, and {'decided', status}. A third value is the approval's
-- created_at when this call ended it ('' otherwise).
-- KEYS: approval acks waiters deadlines pending fatigue audit
-- ARGV: id user_id challenge status decided_by reason now keep backoff_schedule
-- ARGV: user_channel audit_line timeout_reason
-- include: app.approval/finalize app.store/audit
local found = redis.call('HMGET', approval, 'user_id', 'challenge', 'status', 'expires_at',
  'created_at')
if found[1] ~= user_id or found[2] ~= challenge then return {'not_found', '', ''} end
if found[3] ~= 'pending' then return {'final', found[3], ''} end
local ending = {approval = approval, acks = acks, waiters = waiters, deadlines = deadlines,
  pending = pending, fatigue = fatigue}
if tonumber(found[4]) <= tonumber(now) then
  finalize(ending, id, 'expired', now, '', timeout_reason, keep, backoff_schedule, user_channel)
  return {'final', 'expired', found[5]}
end
finalize(ending, id, status, now, decided_by, reason, keep, backoff_schedule, user_channel)
append_audit(audit, audit_line)
return {'decided', status, found[5]}
