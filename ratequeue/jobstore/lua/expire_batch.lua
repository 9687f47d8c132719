-- expire_batch: a batch past its completion window stops; its remaining jobs fail as expired.
--
-- KEYS[1]  batch meta hash rq:batch:{<id>}
-- Only "validating" and "in_progress" move to "finalizing"; the last outcome (or the seal) then
-- ends it as "expired" (_batch_end.lua), so "expired", like every final status, is written once,
-- with its TTLs, and Client.wait() returns only when every job has its outcome. A cancelling
-- batch stays so (cancelled first: its jobs already fail as cancelled), an ended one keeps its
-- final status, and a deleted one is not brought back as a meta hash holding only a status.
-- Returns the status after the call (nil for a batch that does not exist).

local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', redis.call('TIME')[1])
  return 'finalizing'
end
return status
