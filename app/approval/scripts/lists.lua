-- library: add_to_list
-- add_to_list(key, field, value): appends `value` to the JSON list in hash field `field`
-- unless it is there already; true when this call added it.
local function add_to_list(key, field, value)
  local items = cjson.decode(redis.call('HGET', key, field) or '[]')
  for _, item in ipairs(items) do
    if item == value then return false end
  end
  items[#items + 1] = value
  redis.call('HSET', key, field, cjson.encode(items))
  return true
end
