-- delete_batch: remove every key of a batch at once.
--
-- KEYS[1]  batch meta hash rq:batch:{<id>}
-- KEYS[2..] the batch's other keys (keys.batch_keys)
-- ARGV[1]  "1": delete even a batch that has not ended
-- Returns {1, status} when deleted, {0, status} when refused because the batch has not ended
-- (see _batch_end.lua for the final statuses), {0} when there is no such batch. Checked and
-- deleted in one call, so a batch cannot end (or start a new key) between the check and the
-- delete. Only the batch's own keys (one Cluster slot): its members in the shared sets (batch
-- index, deferred set) live in other slots, and the caller removes them (producer/retention.py).

-- include: _batch_end.lua

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0} end
if not FINAL[status] and ARGV[1] ~= '1' then return {0, status} end
redis.call('UNLINK', unpack(KEYS))
return {1, status}
