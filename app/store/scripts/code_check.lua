-- Count one attempt at a code, in the same step as reading what checking it needs:
-- {attempts so far, the stored hash ('' when none was issued), its expiry, its data}.
-- Attempts at a code never issued count too, for `keep` seconds.
-- KEYS: code
-- ARGV: keep
local attempts = redis.call('HINCRBY', code, 'attempts', 1)
if redis.call('TTL', code) < 0 then redis.call('EXPIRE', code, keep) end
local found = redis.call('HMGET', code, 'hash', 'expires_at', 'data')
return {attempts, found[1] or '', found[2] or '0', found[3] or ''}
