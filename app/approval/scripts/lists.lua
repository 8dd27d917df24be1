-- library: add_to_list
-- add_to_list(key, field, value[, current]): appends `value` to the JSON list in hash field
-- `field` unless it is there already; true when this call added it. `current` is the
-- field's value when the caller read it already (false: the field is absent).
local function add_to_list(key, field, value, current)
  if current == nil then current = redis.call('HGET', key, field) end
  local items = cjson.decode(current or '[]')
  for _, item in ipairs(items) do
    if item == value then return false end
  end
  items[#items + 1] = value
  redis.call('HSET', key, field, cjson.encode(items))
  return true
end
