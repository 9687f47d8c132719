-- cancel_batch: ask for a running batch to stop; its remaining jobs are then failed as cancelled.
--
-- KEYS[1]  batch meta hash
-- Only a batch that has not ended moves to "cancelling" (store_outcome.lua ends it as
-- "cancelled", with its TTLs, once the last job has its outcome). Checked and written in one
-- call: an ended batch keeps its status, and a batch deleted meanwhile is not brought back as a
-- meta hash holding only a status, which nothing would ever remove.
-- Returns the status after the call (nil for a batch that does not exist).

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  return status
end
redis.call('HSET', KEYS[1], 'status', 'cancelling')
return 'cancelling'
