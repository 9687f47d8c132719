-- store_outcome: record the one outcome of each of several jobs of one batch, once.
--
-- KEYS[1]  results hash   custom_id -> Batch output line (job answered 2xx)
-- KEYS[2]  errors hash    custom_id -> Batch error line (job failed, cancelled or expired)
-- KEYS[3]  batch meta hash (counters, status; "retention" s, "retained_until" s since epoch)
-- KEYS[4..] the batch's other keys (worker.keys.outcome_keys): they expire with it
-- ARGV     groups of 7, one per job:
--   custom_id, "result" or "error", the line (JSON text),
--   prompt tokens, completion tokens, cached prompt tokens (integers), cost in USD (float text)
--
-- A stored outcome is never overwritten: a redelivered copy of a finished job gets 0 and
-- changes nothing, so no job is counted or charged twice. When every job of a sealed batch has
-- an outcome the batch moves to its final status. Several outcomes go in one call because a
-- worker finishes up to ~1,000 jobs a second: one round trip each cost ~10% of its CPU.
-- Retention: in the same call that sets the final status, every key of the batch is set to
-- expire "retention" seconds later (default 7 days for batches stored without the field), so
-- no ended batch is left without TTLs. A batch whose meta is gone (deleted, or expired) gets
-- nothing: a late outcome must not bring back keys that nothing would ever remove.
-- Returns, per group in order, 1 when stored, 0 when the job already had an outcome (or the
-- batch is gone).

local DEFAULT_RETENTION = 604800
local stored = {}
if redis.call('EXISTS', KEYS[3]) == 0 then
  for _ = 1, #ARGV, 7 do stored[#stored + 1] = 0 end
  return stored
end
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

local m = redis.call('HMGET', KEYS[3], 'completed', 'failed', 'total', 'sealed', 'status', 'retention',
  'retained_until')
local done = (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0)
if m[7] then
  -- Ended already (a late duplicate): a results/errors hash this call created expires with the
  -- rest; the TTLs and the final status are not reset.
  local ttl = redis.call('PTTL', KEYS[3])
  for i = 1, 2 do
    if ttl > 0 and redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
elseif m[4] == '1' and done >= (tonumber(m[3]) or 0) then
  local final = 'completed'
  if m[5] == 'cancelling' or m[5] == 'cancelled' then final = 'cancelled' end
  if m[5] == 'expired' then final = 'expired' end
  local t = redis.call('TIME')
  local retention = tonumber(m[6]) or DEFAULT_RETENTION
  redis.call('HSET', KEYS[3], 'status', final, final .. '_at', t[1],
    'retained_until', math.ceil(tonumber(t[1]) + tonumber(t[2]) / 1e6 + retention))
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], math.ceil(retention * 1000)) end
end
return stored
