-- seal_batch: mark a batch's input as complete, and finish it if every job already has an outcome.
--
-- KEYS[1]  batch meta hash
-- ARGV[1]  status to move to when jobs remain (e.g. "in_progress")
-- Returns the batch's status after sealing.

redis.call('HSET', KEYS[1], 'sealed', '1')
local m = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total', 'status')
local done = (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0)
if done >= (tonumber(m[3]) or 0) then
  local final = 'completed'
  if m[4] == 'cancelling' or m[4] == 'cancelled' then final = 'cancelled' end
  if m[4] == 'expired' then final = 'expired' end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'status', final, final .. '_at', t[1])
  return final
end
if m[4] == 'validating' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
  return ARGV[1]
end
return m[4]
