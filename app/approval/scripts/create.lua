-- Create a pending approval in one atomic step: end the user's pending one (superseded, or
-- expired when its deadline has passed) unless push-fatigue backoff holds, store the new
-- one with its delivery work (in-flight tickets, jobs), announce it on the user's channel
-- and append its audit line (and `superseded_line` for the one it replaced).
-- Nothing changes when the user's pending approval is not `old_id` (the one the caller
-- expects, '' for none): {'pending', its id} asks for a call naming that one. Nor when
-- `planned_with` ('' skips the check) is no longer the user's snapshot: {'changed', the
-- snapshot now}. Otherwise {'created' or 'backoff', the superseded id or the seconds to
-- wait, the id of an approval this call ended as expired}. A repeated call (its reply was
-- lost) changes nothing and answers 'created'.
-- old_approval, old_acks and old_waiters are the keys of `old_id` (any key of the shard
-- when it is '').
-- KEYS: approval inflight pending fatigue deadlines presence account_version processes
-- KEYS: jobs_due jobs_data audit old_approval old_acks old_waiters
-- ARGV: id old_id now expires_at keep fields tickets jobs planned_with process_ttl
-- ARGV: backoff_schedule final_keep user_channel request_event audit_line superseded_line
-- ARGV: wake timeout_reason superseded_reason
-- include: app.approval/finalize app.store/snapshot app.store/schedule app.store/audit
local old = redis.call('GET', pending)
if old == id then return {'created', '', ''} end
if old and old ~= old_id then return {'pending', old, ''} end
if planned_with ~= '' then
  local current = table.concat(snapshot(presence, account_version, processes, process_ttl), '\n')
  if current ~= planned_with then return {'changed', current, ''} end
end
local at = tonumber(now)
local ending = {approval = old_approval, acks = old_acks, waiters = old_waiters,
  deadlines = deadlines, pending = pending, fatigue = fatigue}
local old_status, expired_old = nil, ''
if old then
  local found = redis.call('HMGET', old_approval, 'status', 'expires_at')
  old_status = found[1]
  if old_status == 'pending' and tonumber(found[2]) <= at then
    finalize(ending, old, 'expired', now, '', timeout_reason, final_keep, backoff_schedule,
      user_channel)
    old_status, expired_old = 'expired', old
  end
end
local next_at = tonumber(redis.call('HGET', fatigue, 'next_at') or '0')
if next_at > at then return {'backoff', tostring(math.ceil(next_at - at)), expired_old} end
local superseded = ''
if old_status == 'pending' then
  finalize(ending, old, 'expired', now, '', superseded_reason, final_keep, backoff_schedule,
    user_channel)
  append_audit(audit, superseded_line)
  superseded = old
end
redis.call('HSET', approval, unpack(cjson.decode(fields)))
redis.call('EXPIRE', approval, keep)
local under_way = cjson.decode(tickets)
if #under_way > 0 then
  redis.call('SADD', inflight, unpack(under_way))
  redis.call('EXPIRE', inflight, keep)
end
enqueue_jobs(jobs_due, jobs_data, wake, now, cjson.decode(jobs))
redis.call('SET', pending, id, 'EX', keep)
redis.call('ZADD', deadlines, expires_at, id)
redis.call(PUBLISH, user_channel, request_event)
append_audit(audit, audit_line)
return {'created', superseded, expired_old}
