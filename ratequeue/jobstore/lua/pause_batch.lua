-- pause_batch: pause (ARGV[1] = "1") or unpause (ARGV[1] = "0") a running batch.
--
-- KEYS[1]  batch meta hash rq:batch:{<id>}
-- A paused batch keeps its status (OpenAI's in_progress): the field "paused" = "1" tells workers
-- to make no new call for it (its jobs stay pending, with no outcome, until a resume enqueues them
-- again). Only "validating" and "in_progress" batches are paused; unpausing works on any batch
-- (cancel_batch.lua unpauses too). A batch that does not exist is not brought back.
-- Returns {status, paused} after the call (status nil for a batch that does not exist).

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {false, 0}
end
if ARGV[1] == '1' and (status == 'validating' or status == 'in_progress') then
  redis.call('HSET', KEYS[1], 'paused', '1', 'paused_at', redis.call('TIME')[1])
elseif ARGV[1] == '0' then
  redis.call('HDEL', KEYS[1], 'paused')
end
local paused = redis.call('HGET', KEYS[1], 'paused') == '1' and 1 or 0
return {status, paused}
