-- cancel_batch: ask a running batch to stop; its remaining jobs are then failed as cancelled.
--
-- KEYS[1]  batch meta hash rq:batch:{<id>}
-- Only "validating" and "in_progress" move to "cancelling" (the last outcome, or the seal, then
-- ends it as "cancelled": _batch_end.lua). A finalizing batch stays so: its window has passed and
-- its jobs already fail as expired. An ended batch keeps its final status, and a batch deleted
-- meanwhile is not brought back as a meta hash holding only a status. Checked and written in
-- one call, so no outcome can land between the check and the write.
-- Returns the status after the call (nil for a batch that does not exist).

local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', redis.call('TIME')[1])
  redis.call('HDEL', KEYS[1], 'paused')  -- a cancelled batch is no longer paused: its jobs fail
  return 'cancelling'
end
return status
