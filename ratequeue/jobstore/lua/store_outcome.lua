-- store_outcome: record the one outcome of each of several jobs of one batch, once.
--
-- KEYS[1]  results hash   custom_id -> Batch output line (job answered 2xx)
-- KEYS[2]  errors hash    custom_id -> Batch error line (job failed, cancelled or expired)
-- KEYS[3]  batch meta hash rq:batch:{<id>} (counters, status; "retention" s)
-- KEYS[4..] the batch's other keys (keys.outcome_keys): they expire with it
-- ARGV     groups of 7, one per job:
--   custom_id, "result" or "error", the line (JSON text),
--   prompt tokens, completion tokens, cached prompt tokens (integers), cost in USD (float text)
--
-- A stored outcome is never overwritten: a redelivered copy of a finished job gets 0 and
-- changes nothing, so no job is counted or charged twice. When every job of a sealed batch has
-- an outcome the batch ends, in this same call, by the one rule of _batch_end.lua (final status
-- and TTLs). Several outcomes go in one call because a worker finishes up to ~1,000 jobs a
-- second: one round trip each cost ~10% of its CPU. A batch whose meta is gone (deleted, or
-- expired) gets nothing: a late outcome must not bring back keys that nothing would remove.
-- Returns, per group in order, 1 when stored, 0 when the job already had an outcome (or the
-- batch is gone).

-- include: _batch_end.lua

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

if FINAL[redis.call('HGET', KEYS[3], 'status')] then
  -- Ended already (a job added after the end): a results/errors hash this call created expires
  -- with the rest; the TTLs and the final status are not reset.
  local ttl = redis.call('PTTL', KEYS[3])
  for i = 1, 2 do
    if ttl > 0 and redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
else
  end_if_done(KEYS[3], KEYS)
end
return stored
