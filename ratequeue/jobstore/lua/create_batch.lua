-- create_batch: store a new batch record, status "validating" (the state machine's first state).
--
-- KEYS[1]  batch meta hash rq:batch:{<id>} (fields: ratequeue/jobstore/batches.py)
-- ARGV[1]  completion window in seconds (expires_at = created_at + window)
-- ARGV[2..] field, value pairs the caller describes the batch with (id, account, endpoint, ...)
-- The status, counters and times are written here, after the caller's fields, so a caller can
-- neither pick another first status nor skew the times (they come from Redis's clock, as do all
-- times of a batch). Refused for an id already in use: a batch is never created twice.
-- Returns created_at in ms since epoch.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('ERR create_batch: batch exists ' .. KEYS[1])
end
local t = redis.call('TIME')
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('HSET', KEYS[1], 'status', 'validating', 'created_at', t[1],
  'expires_at', tonumber(t[1]) + math.floor(tonumber(ARGV[1])),
  'total', 0, 'completed', 0, 'failed', 0, 'sealed', 0)
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
