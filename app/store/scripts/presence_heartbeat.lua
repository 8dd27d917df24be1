-- A process says it is alive: its heartbeat, on Redis's own clock, in a shard's process
-- registry (where the snapshot library looks processes up). Processes silent for
-- `forget_after` seconds leave the registry.
-- KEYS: processes
-- ARGV: process forget_after
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
redis.call('ZADD', processes, now, process)
redis.call('ZREMRANGEBYSCORE', processes, '-inf', now - tonumber(forget_after))
return 1
