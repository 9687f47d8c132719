-- delete_batch: remove a batch and every key of it at once.
--
-- KEYS[1]  batches index (sorted set of batch ids, worker.keys.batches_index)
-- KEYS[2]  batch meta hash
-- KEYS[3..] the batch's other keys (worker.keys.batch_keys)
-- ARGV[1]  batch id (its member in the index)
-- ARGV[2]  "1": delete even a batch that is still running
-- Returns {1, status} when deleted, {0, status} when refused because the batch is still running
-- (not completed, failed, cancelled or expired), {0} when there is no such batch. Checked and
-- deleted in one call, so a batch cannot end (or start a new key) between the check and the
-- delete. Its entries in the deferred set are not found from here (that needs a scan): the
-- caller removes them, and a worker drops any it meets (worker/deferred.py).

local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {0} end
local ended = status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired'
if not ended and ARGV[2] ~= '1' then return {0, status} end
redis.call('UNLINK', unpack(KEYS, 2))
redis.call('ZREM', KEYS[1], ARGV[1])
return {1, status}
