-- recheck_later: defer the jobs of a chunk that another live run holds, to be looked at again.
--
-- KEYS[1]  results hash  custom_id -> output line
-- KEYS[2]  errors hash   custom_id -> error line
-- KEYS[3]  claims hash   custom_id -> "<owner> <lease expiry in ms>"
-- KEYS[4]  deferred set  "<batch_id>\t<custom_id>" scored by due time in ms
-- Redis Cluster: the one job-store script that mixes a batch's keys (slot of {<batch_id>}) with
-- a shared key (the deferred set, its own slot), so it fails with CROSSSLOT on a cluster. Kept
-- as one call on a single Redis, where the check and the defer cannot be split by a finishing
-- job; on a cluster it would become two calls (check the leases, then defer.lua), which is safe
-- too: a job deferred after it finished is skipped by claim_jobs.lua when it comes due.
-- ARGV[1]  owner of the run asking
-- ARGV[2]  delay in ms: the re-check is due when the holder's lease ends, or this long from now
--          if that comes first (a live run renews its lease: the re-check finds it renewed and waits again)
-- ARGV[3]  member prefix "<batch_id>\t"
-- ARGV[4..] custom_ids
--
-- A job with no outcome whose lease another live run holds is deferred. Dropped instead, a killed
-- run's jobs would never run; run now, one job would have two calls open. Returns how many were
-- deferred. The entry always takes the new time (no NX): an entry already there may be the
-- deferred mover's claim of this very job (claim_due.lua), and release_due.lua removes entries
-- whose score is still that claim's; kept by NX, the re-check was removed with it and the job
-- never looked at again (issue 10: a resume after kill -9 ran only the jobs that won this race).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for i = 4, #ARGV do
  local cid = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], cid) == 0 and redis.call('HEXISTS', KEYS[2], cid) == 0 then
    local claim = redis.call('HGET', KEYS[3], cid)
    if claim then
      local holder, expiry = string.match(claim, '^(%S+) (%d+)$')
      if holder ~= ARGV[1] and tonumber(expiry) > now then
        redis.call('ZADD', KEYS[4], math.min(tonumber(expiry), now + tonumber(ARGV[2])), ARGV[3] .. cid)
        n = n + 1
      end
    end
  end
end
return n
