-- store_outcome: record the one outcome of a job, once.
--
-- KEYS[1]  results hash   custom_id -> Batch output line (job answered 2xx)
-- KEYS[2]  errors hash    custom_id -> Batch error line (job failed, cancelled or expired)
-- KEYS[3]  batch meta hash (counters, status)
-- ARGV[1]  custom_id
-- ARGV[2]  "result" or "error"
-- ARGV[3]  the line (JSON text)
-- ARGV[4]  prompt tokens, ARGV[5] completion tokens, ARGV[6] cached prompt tokens (integers)
-- ARGV[7]  cost in USD (float text)
--
-- A stored outcome is never overwritten: a redelivered copy of a finished job returns 0 and
-- changes nothing, so no job is counted or charged twice. When every job of a sealed batch has
-- an outcome the batch moves to its final status.
-- Returns 1 when stored, 0 when the job already had an outcome.

local cid = ARGV[1]
if redis.call('HEXISTS', KEYS[1], cid) == 1 or redis.call('HEXISTS', KEYS[2], cid) == 1 then
  return 0
end
local target, counter
if ARGV[2] == 'result' then
  target, counter = KEYS[1], 'completed'
else
  target, counter = KEYS[2], 'failed'
end
redis.call('HSET', target, cid, ARGV[3])
redis.call('HINCRBY', KEYS[3], counter, 1)
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', KEYS[3], 'cached_tokens', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBYFLOAT', KEYS[3], 'cost_usd', ARGV[7]) end

local m = redis.call('HMGET', KEYS[3], 'completed', 'failed', 'total', 'sealed', 'status')
local done = (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0)
if m[4] == '1' and done >= (tonumber(m[3]) or 0) then
  local final = 'completed'
  if m[5] == 'cancelling' or m[5] == 'cancelled' then final = 'cancelled' end
  if m[5] == 'expired' then final = 'expired' end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[3], 'status', final, final .. '_at', t[1])
end
return 1
