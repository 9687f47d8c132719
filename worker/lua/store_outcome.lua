-- store_outcome: record the one outcome of each of several jobs of one batch, once.
--
-- KEYS[1]  results hash   custom_id -> Batch output line (job answered 2xx)
-- KEYS[2]  errors hash    custom_id -> Batch error line (job failed, cancelled or expired)
-- KEYS[3]  batch meta hash (counters, status)
-- ARGV     groups of 7, one per job:
--   custom_id, "result" or "error", the line (JSON text),
--   prompt tokens, completion tokens, cached prompt tokens (integers), cost in USD (float text)
--
-- A stored outcome is never overwritten: a redelivered copy of a finished job gets 0 and
-- changes nothing, so no job is counted or charged twice. When every job of a sealed batch has
-- an outcome the batch moves to its final status. Several outcomes go in one call because a
-- worker finishes up to ~1,000 jobs a second: one round trip each cost ~10% of its CPU.
-- Returns, per group in order, 1 when stored, 0 when the job already had an outcome.

local stored = {}
local counts = {completed = 0, failed = 0, prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0}
local cost = 0
for i = 1, #ARGV, 7 do
  local cid = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], cid) == 1 or redis.call('HEXISTS', KEYS[2], cid) == 1 then
    stored[#stored + 1] = 0
  else
    if ARGV[i + 1] == 'result' then
      redis.call('HSET', KEYS[1], cid, ARGV[i + 2])
      counts.completed = counts.completed + 1
    else
      redis.call('HSET', KEYS[2], cid, ARGV[i + 2])
      counts.failed = counts.failed + 1
    end
    counts.prompt_tokens = counts.prompt_tokens + tonumber(ARGV[i + 3])
    counts.completion_tokens = counts.completion_tokens + tonumber(ARGV[i + 4])
    counts.cached_tokens = counts.cached_tokens + tonumber(ARGV[i + 5])
    cost = cost + tonumber(ARGV[i + 6])
    stored[#stored + 1] = 1
  end
end
for field, n in pairs(counts) do
  if n > 0 then redis.call('HINCRBY', KEYS[3], field, n) end
end
if cost > 0 then redis.call('HINCRBYFLOAT', KEYS[3], 'cost_usd', string.format('%.17g', cost)) end

local m = redis.call('HMGET', KEYS[3], 'completed', 'failed', 'total', 'sealed', 'status')
local done = (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0)
if m[4] == '1' and done >= (tonumber(m[3]) or 0) then
  local final = 'completed'
  if m[5] == 'cancelling' or m[5] == 'cancelled' then final = 'cancelled' end
  if m[5] == 'expired' then final = 'expired' end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[3], 'status', final, final .. '_at', t[1])
end
return stored
