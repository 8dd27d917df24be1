-- A device of `user_id` received the approval's request: count its ack once, tell the
-- browser once that the request reached the person by `channel`, and when every connected
-- device the ack check waits for has acked, cancel that check (its job and its in-flight
-- ticket): nothing is left to push or text.
-- Returns -1 when the approval is unknown or not the user's, 1 the first time, else 0.
-- KEYS: approval acks inflight jobs_due jobs_data
-- ARGV: user_id device channel delivered_channel delivered_event
-- include: app.approval/lists app.store/schedule
-- One read of the four fields it may need (each Redis command inside a script costs the
-- Redis core every process shares).
local found = redis.call('HMGET', approval, 'user_id', 'status', 'delivered', 'ack_check')
if not found[1] or found[1] ~= user_id then return -1 end
if found[2] ~= 'pending' then return 0 end
local added = redis.call('SADD', acks, device)
if added == 1 then
  redis.call('EXPIRE', acks, redis.call('TTL', approval))
  if add_to_list(approval, 'delivered', channel, found[3]) then
    redis.call(PUBLISH, delivered_channel, delivered_event)
  end
  local check = found[4]
  if check then
    check = cjson.decode(check)
    local all = true
    for _, waited in ipairs(check.devices) do
      if redis.call('SISMEMBER', acks, waited) == 0 then all = false end
    end
    if all then
      cancel_job(jobs_due, jobs_data, check.job)
      redis.call('SREM', inflight, check.ticket)
      redis.call('HDEL', approval, 'ack_check')
    end
  end
end
return added
