-- library: enqueue_jobs cancel_job
-- The delivery job queue's layout (app.store.jobs), for scripts that queue or cancel jobs
-- in the same atomic step as their own change.
-- enqueue_jobs(due, data, wake, now, jobs): `jobs` is a list of {id, body, run_at}
-- (PreparedJob.lua()); `wake` is published when one of them is due at once.
local function enqueue_jobs(due, data, wake, now, jobs)
  local woken = false
  for _, job in ipairs(jobs) do
    redis.call('HSET', data, job[1], job[2])
    redis.call('ZADD', due, job[3], job[1])
    if tonumber(job[3]) <= tonumber(now) then woken = true end
  end
  if woken then redis.call(PUBLISH, wake, '1') end
end
-- cancel_job(due, data, id): a job not claimed yet never runs.
local function cancel_job(due, data, id)
  redis.call('ZREM', due, id)
  redis.call('HDEL', data, id)
end
