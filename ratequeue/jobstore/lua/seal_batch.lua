-- seal_batch: mark a batch's input as complete; end it if every job already has an outcome.
--
-- KEYS[1]  batch meta hash rq:batch:{<id>}
-- KEYS[2..] the batch's other keys (keys.batch_keys): they expire with it when it ends
-- A "validating" batch moves to "in_progress"; a cancelling or finalizing one keeps its status.
-- An ended batch is left as it is: sealing it again (resume) must not extend its retention.
-- Returns the batch's status after sealing; an error for a batch that does not exist (sealing
-- it would create a meta hash that nothing ever removes).

-- include: _batch_end.lua

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('ERR seal_batch: no batch ' .. KEYS[1]) end
if FINAL[status] then return status end
redis.call('HSET', KEYS[1], 'sealed', '1')
if status == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', redis.call('TIME')[1])
end
return end_if_done(KEYS[1], KEYS)
