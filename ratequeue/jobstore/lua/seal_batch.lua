-- seal_batch: mark a batch's input as complete, and finish it if every job already has an outcome.
--
-- KEYS[1]  batch meta hash ("retention" s, "retained_until" s since epoch once ended)
-- KEYS[2..] the batch's other keys (worker.keys.batch_keys): they expire with it
-- ARGV[1]  status to move to when jobs remain (e.g. "in_progress")
-- Returns the batch's status after sealing; an error for a batch that does not exist (sealing
-- it would create a meta hash that nothing ever removes).
--
-- Finishing here sets every key to expire "retention" seconds later, in this same call, as
-- store_outcome.lua does (default 7 days for batches stored without the field). A batch that
-- has ended already is left as it is: sealing it again (resume) must not extend its retention.

local DEFAULT_RETENTION = 604800
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('ERR seal_batch: no batch ' .. KEYS[1])
end
local m = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total', 'status', 'retention', 'retained_until')
if m[6] then return m[4] end
redis.call('HSET', KEYS[1], 'sealed', '1')
local done = (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0)
if done >= (tonumber(m[3]) or 0) then
  local final = 'completed'
  if m[4] == 'cancelling' or m[4] == 'cancelled' then final = 'cancelled' end
  if m[4] == 'expired' then final = 'expired' end
  local t = redis.call('TIME')
  local retention = tonumber(m[5]) or DEFAULT_RETENTION
  redis.call('HSET', KEYS[1], 'status', final, final .. '_at', t[1],
    'retained_until', math.ceil(tonumber(t[1]) + tonumber(t[2]) / 1e6 + retention))
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], math.ceil(retention * 1000)) end
  return final
end
if m[4] == 'validating' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
  return ARGV[1]
end
return m[4]
