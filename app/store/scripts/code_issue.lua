-- Keep a one-time code: its hash, when it stops being valid, and `data` to hand back with
-- it, for `keep` seconds. With `fresh_attempts` = '1' the attempts counted so far are
-- forgotten (a new code, a new budget); otherwise they carry over to the new code.
-- KEYS: code
-- ARGV: code_hash expires_at data keep fresh_attempts
if fresh_attempts == '1' then redis.call('DEL', code) end
redis.call('HSET', code, 'hash', code_hash, 'expires_at', expires_at, 'data', data)
redis.call('EXPIRE', code, keep)
return 1
