-- record_attempt: count one failed upstream attempt of a job and keep what went wrong.
--
-- KEYS[1]  batch meta hash
-- KEYS[2]  attempts hash      custom_id -> failed attempts so far
-- KEYS[3]  last failure hash  custom_id -> JSON {status, message} of the last failed attempt
-- ARGV[1]  custom_id
-- ARGV[2]  the failure's JSON
-- ARGV[3]  "0": keep the failure without counting it (a rate-limit 429 is waiting, not an attempt)
-- Returns the job's attempts so far, or -1 when the batch is gone (deleted or expired): nothing
-- is written then, since hashes created for a batch that no longer exists would never expire.
-- A batch that has ended already (its meta has a TTL) passes its TTL on to a hash created here.

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local count
if ARGV[3] == '0' then
  count = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0)
else
  count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
for i = 2, 3 do
  if ttl > 0 and redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return count
