-- library: finalize
-- finalize(k, id, status, now, decided_by, reason, keep, backoff_schedule, user_channel)
-- ends the pending approval `id` with `status`, for `reason` (never '': the caller gives the
-- status's default, app.approval.rules.end_reason). `k` holds its keys (approval, acks,
-- waiters) and its user's and shard's (pending, fatigue, deadlines); the final state stays
-- readable `keep` seconds. Any end but `approved` counts as a failure for push-fatigue
-- backoff: the user's next approval waits the schedule's entry for the failures counted so
-- far (app.approval.rules computes the schedule; this only looks it up); `approved` forgets
-- them. Each waiting process hears the end in its inbox, the user's devices on `user_channel`.
local function finalize(k, id, status, now, decided_by, reason, keep, backoff_schedule, user_channel)
  if decided_by ~= '' then
    redis.call('HSET', k.approval, 'status', status, 'decided_at', now, 'reason', reason,
      'decided_by', decided_by)
  else
    redis.call('HSET', k.approval, 'status', status, 'decided_at', now, 'reason', reason)
  end
  redis.call('EXPIRE', k.approval, keep)
  redis.call('EXPIRE', k.acks, keep)
  redis.call('ZREM', k.deadlines, id)
  if redis.call('GET', k.pending) == id then redis.call('DEL', k.pending) end
  if status == 'approved' then
    redis.call('DEL', k.fatigue)
  else
    local failures = redis.call('HINCRBY', k.fatigue, 'failures', 1)
    local waits = {}
    for wait in string.gmatch(backoff_schedule, '%d+') do waits[#waits + 1] = tonumber(wait) end
    redis.call('HSET', k.fatigue, 'next_at', tonumber(now) + waits[math.min(failures, #waits)])
    -- Failures are forgotten after a day without a new one (the longest wait is an hour).
    redis.call('EXPIRE', k.fatigue, 86400)
  end
  -- decided_at travels as the string stored above, so every waiter renders the same time.
  local ended = cjson.encode({type = 'result', id = id, status = status, decided_at = now,
    reason = reason})
  for _, inbox in ipairs(redis.call('SMEMBERS', k.waiters)) do
    redis.call(PUBLISH, inbox, ended)
  end
  redis.call('DEL', k.waiters)
  redis.call(PUBLISH, user_channel,
    cjson.encode({type = 'approval_resolved', id = id, status = status, reason = reason}))
end
