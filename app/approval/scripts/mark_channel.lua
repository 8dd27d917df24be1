-- Record a channel on a pending approval, in `list`: 'channels' (the request went out by
-- it) or 'delivered' (it reached the person, and so is among the channels too). The first
-- time, `event` ('' for none) goes out on `delivered_channel` for the browser's stream:
-- the browser hears of each channel once, however many devices it reached.
-- KEYS: approval
-- ARGV: channel list delivered_channel event
-- include: app.approval/lists
if redis.call('HGET', approval, 'status') ~= 'pending' then return 0 end
local added = add_to_list(approval, list, channel)
if list == 'delivered' then add_to_list(approval, 'channels', channel) end
if added and event ~= '' then redis.call(PUBLISH, delivered_channel, event) end
return 1
