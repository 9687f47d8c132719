-- park.lua: park one (account, model) pair, keeping when it was first parked.
--
-- Key schema: KEYS[1] = jobstore.keys.parked_pairs(), a hash pair_field -> JSON entry
--   {reason, message, since, last_probe, cooldown}; KEYS[2] = jobstore.keys.probe_lock(account, model).
--
-- A probe that fails parks the pair again: its entry's `since` stays the first park's (a pair
-- parked for hours must not look a minute old: issue 12, finding 2) and `last_probe` is now.
-- One script, so an unpark between reading and writing the entry cannot be undone by an old `since`.
--
-- ARGV[1] pair field; ARGV[2] the new entry (JSON: reason, message, cooldown);
-- ARGV[3] now (s since epoch, the worker's clock, as every `since` ever written);
-- ARGV[4] cooldown (ms): the probe lock's life.
-- Returns the entry's `since`, as a string.

local entry = cjson.decode(ARGV[2])
local now = tonumber(ARGV[3])
local since = now
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, previous = pcall(cjson.decode, old)
  if ok and type(previous) == 'table' and tonumber(previous['since']) then
    since = tonumber(previous['since'])
  end
end
entry['since'] = since
entry['last_probe'] = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('SET', KEYS[2], 'parked', 'PX', ARGV[4])
return tostring(since)
