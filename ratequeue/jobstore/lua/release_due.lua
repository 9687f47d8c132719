-- release_due: remove re-enqueued deferred entries, unless they were deferred again meanwhile.
--
-- KEYS[1]  deferred sorted set (see claim_due.lua)
-- ARGV[1]  the lease score claim_due.lua gave them
-- ARGV[2..] members
-- A member whose score is no longer the lease score was deferred anew by a worker that ran it
-- in between; it must stay. Returns the number removed.

local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
