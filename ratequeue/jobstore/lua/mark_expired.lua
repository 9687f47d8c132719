-- mark_expired: move a running batch past its completion window to "expired".
--
-- KEYS[1]  batch meta hash
-- Only a running batch (validating, in_progress, finalizing) changes; its remaining jobs then
-- fail as expired and store_outcome.lua ends it (and sets its TTLs) with the last one. Checked
-- and written in one call: a batch that ended or was deleted meanwhile must keep its status,
-- and a deleted one must not come back as a meta hash holding only a status, with no TTL.
-- Returns the status after the call (nil for a batch that does not exist).

local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' or status == 'finalizing' then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  return 'expired'
end
return status
