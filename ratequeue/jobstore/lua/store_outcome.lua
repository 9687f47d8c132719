-- store_outcome: record the one outcome of each of several jobs of one batch, once.
--
-- KEYS[1]  results hash   custom_id -> Batch output line (job answered 2xx)
-- KEYS[2]  errors hash    custom_id -> Batch error line (job failed, cancelled or expired)
-- KEYS[3]  batch meta hash rq:batch:{<id>} (counters, status; "retention" s)
-- KEYS[4]  jobs hash      custom_id -> stored job (JSON: "m" its model, "c" its charge)
-- KEYS[5]  claims hash    custom_id -> the lease of the run executing it
-- KEYS[6]  models hash    "<counter>:<model>" -> per-model counters (keys.batch_models)
-- KEYS[7]  totals hash    rq:totals, the deployment's counters since Redis began (keys.totals): not
--          the batch's, it never expires
-- KEYS[8..] the batch's other keys (keys.outcome_keys): they expire with it
-- ARGV     groups of 7, one per job:
--   custom_id, "result" or "error", the line (JSON text),
--   prompt tokens, completion tokens, cached prompt tokens, cost in nano-dollars (integers)
--
-- A stored outcome is never overwritten: a redelivered copy of a finished job gets 0 and
-- changes nothing, so no job is counted or charged twice. When every job of a sealed batch has
-- an outcome the batch ends, in this same call, by the one rule of _batch_end.lua (final status
-- and TTLs). Several outcomes go in one call because a worker finishes up to ~1,000 jobs a
-- second: one round trip each cost ~10% of its CPU. A batch whose meta is gone (deleted, or
-- expired) gets nothing: a late outcome must not bring back keys that nothing would remove.
-- Each stored outcome also counts in its model's counters ("completed:<m>" or "failed:<m>", and
-- its charge in "charge_done:<m>"), read from the stored job here rather than passed by the
-- caller, so every caller counts the same way (a job stored at submit as an input error has no
-- stored job and counts under no model). Reading and decoding the job made the script ~10 us
-- dearer per outcome with 2 KB jobs (7 -> 18 us, a noisy 2-core box): ~1% of a Redis core at
-- 1,000 outcomes a second. Its lease is dropped: the claims hash so holds only jobs still
-- running, and `status` counts the jobs in flight from it without scanning the jobs done.
-- The totals hash gets, per model, "completed:<m>", "failed:<m>", "prompt_tokens:<m>",
-- "completion_tokens:<m>" and "cost_nusd:<m>", and for the whole deployment "cost_nusd_day:<d>"
-- (d: days since 1970-01-01 by Redis's clock, the UTC day): the exporter publishes them as
-- counters (ratequeue/producer/exporter_totals.py). Counted here, in the step that stores the
-- outcome, they equal what Redis holds whatever happens to the worker that sent them, and a job
-- stored twice is counted once. Cost is whole nano-dollars, priced by the worker (the model
-- table is the worker's): sums of integers are exact, and a price per 1M tokens with 3 decimals
-- is a whole number of nano-dollars per token. A job without a stored job (an input line refused
-- at submit) counts under no model. Redis Cluster: the totals hash is a shared key in its own
-- slot, like the deferred set in recheck_later.lua: this script then fails with CROSSSLOT (on a
-- cluster the totals would be a second call).
-- Returns, per group in order, 1 when stored, 0 when the job already had an outcome (or the
-- batch is gone).

-- include: _batch_end.lua

-- Add one stored outcome to its model's counters in `by_model` and the deployment's in `totals`
-- (see the header), written once per call. A job that is not a JSON object with a model (none of
-- ours) counts under no model.
local by_model, totals = {}, {}
local function add(counters, field, n)
  counters[field] = (counters[field] or 0) + n
end
local function count_for_model(cid, completed, prompt, completion, cost)
  local raw = redis.call('HGET', KEYS[4], cid)
  if not raw then return end
  local ok, job = pcall(cjson.decode, raw)
  if not ok or type(job) ~= 'table' or type(job.m) ~= 'string' then return end
  local outcome = (completed and 'completed:' or 'failed:') .. job.m
  add(by_model, outcome, 1)
  add(by_model, 'charge_done:' .. job.m, math.floor(tonumber(job.c) or 0))
  add(totals, outcome, 1)
  add(totals, 'prompt_tokens:' .. job.m, prompt)
  add(totals, 'completion_tokens:' .. job.m, completion)
  add(totals, 'cost_nusd:' .. job.m, cost)
end

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
    local prompt, completion = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local nusd = math.floor(tonumber(ARGV[i + 6]))
    count_for_model(cid, ARGV[i + 1] == 'result', prompt, completion, nusd)
    redis.call('HDEL', KEYS[5], cid)
    counts.prompt_tokens = counts.prompt_tokens + prompt
    counts.completion_tokens = counts.completion_tokens + completion
    counts.cached_tokens = counts.cached_tokens + tonumber(ARGV[i + 5])
    cost = cost + nusd
    stored[#stored + 1] = 1
  end
end
for field, n in pairs(counts) do
  if n > 0 then redis.call('HINCRBY', KEYS[3], field, n) end
end
if cost > 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'cost_usd', string.format('%.17g', cost / 1e9))
  local day = math.floor(tonumber(redis.call('TIME')[1]) / 86400)
  add(totals, 'cost_nusd_day:' .. day, cost)
end
for field, n in pairs(by_model) do
  if n > 0 then redis.call('HINCRBY', KEYS[6], field, n) end
end
for field, n in pairs(totals) do
  if n > 0 then redis.call('HINCRBY', KEYS[7], field, n) end
end

if FINAL[redis.call('HGET', KEYS[3], 'status')] then
  -- Ended already (a job added after the end): a results/errors/models hash this call created expires
  -- with the rest; the TTLs and the final status are not reset.
  local ttl = redis.call('PTTL', KEYS[3])
  for _, i in ipairs({1, 2, 6}) do
    if ttl > 0 and redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
else
  local batch_keys = {}
  for i, key in ipairs(KEYS) do
    if i ~= 7 then batch_keys[#batch_keys + 1] = key end  -- the totals outlive every batch
  end
  end_if_done(KEYS[3], batch_keys)
end
return stored
