-- _batch_end (a library, not an operation): the batch state machine's one rule for ending a
-- batch. Pasted by ratequeue/jobstore/scripts.py into every script that says
-- "-- include: _batch_end.lua" (seal_batch, store_outcome, finalise_batch), because one Redis
-- script cannot call another atomically; the rule so lives here and nowhere else.
--
-- Statuses (ratequeue/jobstore/batches.py, BatchStatus):
--   validating  -> in_progress (seal) | cancelling (cancel) | finalizing (expire)
--   in_progress -> cancelling (cancel) | finalizing (expire) | completed (last outcome)
--   cancelling  -> cancelled   (last outcome, or seal once every job has one)
--   finalizing  -> expired     (the window passed: remaining jobs fail as expired, then it ends)
--   completed, failed, expired, cancelled: final, never written again by any script.
-- A batch ends when it is sealed and every job has an outcome (completed + failed >= total).
-- Ending sets "status", "<status>_at" and "retained_until", and every key of the batch to
-- expire "retention" seconds later (7 days for a batch stored without the field), in the same
-- call: no ended batch is left without TTLs.

local DEFAULT_RETENTION = 604800
local FINAL = {completed = true, failed = true, expired = true, cancelled = true}

-- The final status of a batch that ends while in `status`.
local function final_status(status)
  if status == 'cancelling' then return 'cancelled' end
  if status == 'finalizing' then return 'expired' end
  return 'completed'
end

-- End the batch of meta hash `meta` (its keys: `batch_keys`, meta among them) if it is sealed,
-- not ended and every job has an outcome. Returns the status after the call (nil: no batch).
local function end_if_done(meta, batch_keys)
  local m = redis.call('HMGET', meta, 'status', 'sealed', 'total', 'completed', 'failed', 'retention')
  local status = m[1]
  if not status or FINAL[status] or m[2] ~= '1' then return status end
  if (tonumber(m[4]) or 0) + (tonumber(m[5]) or 0) < (tonumber(m[3]) or 0) then return status end
  local final = final_status(status)
  local t = redis.call('TIME')
  local retention = tonumber(m[6]) or DEFAULT_RETENTION
  redis.call('HSET', meta, 'status', final, final .. '_at', t[1],
    'retained_until', math.ceil(tonumber(t[1]) + tonumber(t[2]) / 1e6 + retention))
  for _, key in ipairs(batch_keys) do redis.call('PEXPIRE', key, math.ceil(retention * 1000)) end
  return final
end
