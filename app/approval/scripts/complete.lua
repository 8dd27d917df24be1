-- Mark an approved sign-in used, once: 'ok', or why not ('not_found', 'not_approved',
-- 'already_completed').
-- KEYS: approval
-- ARGV:
local status = redis.call('HGET', approval, 'status')
if not status then return 'not_found' end
if status ~= 'approved' then return 'not_approved' end
if redis.call('HGET', approval, 'completed') == '1' then return 'already_completed' end
redis.call('HSET', approval, 'completed', '1')
return 'ok'
