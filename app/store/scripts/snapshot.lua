-- library: snapshot
-- snapshot(presence, account_version, processes, process_ttl) -> {the user's account version
-- ('' before any change), then the ids of their devices whose socket a live process holds,
-- sorted}. `presence` maps device -> process; a process is live while its last heartbeat
-- in the shard's registry `processes` (Redis's own clock) is under `process_ttl` seconds old.
local function snapshot(presence, account_version, processes, process_ttl)
  local time = redis.call('TIME')
  local oldest = tonumber(time[1]) + tonumber(time[2]) / 1000000 - tonumber(process_ttl)
  local entries = redis.call('HGETALL', presence)
  local live, alive = {}, {}
  for i = 1, #entries, 2 do
    local process = entries[i + 1]
    if alive[process] == nil then
      local beat = redis.call('ZSCORE', processes, process)
      alive[process] = beat ~= false and tonumber(beat) >= oldest
    end
    if alive[process] then live[#live + 1] = entries[i] end
  end
  table.sort(live)
  table.insert(live, 1, redis.call('GET', account_version) or '')
  return live
end
