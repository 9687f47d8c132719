-- claim_jobs: take a lease on the jobs of a chunk that still need running; return them.
--
-- KEYS[1]  jobs hash     custom_id -> stored job (JSON)
-- KEYS[2]  results hash  custom_id -> output line
-- KEYS[3]  errors hash   custom_id -> error line
-- KEYS[4]  claims hash   custom_id -> "<owner> <lease expiry in ms>"
-- KEYS[5]  started hash  custom_id -> ms of the job's first run (set once)
-- ARGV[1]  lease in ms
-- ARGV[2]  owner (unique per chunk run)
-- ARGV[3..] custom_ids
--
-- A job with an outcome is skipped (a redelivered chunk makes no upstream call for it). A job
-- leased by another live run is skipped too, so two copies of one message never call upstream
-- for the same job at once; a lease left by a killed worker expires and the job can run again.
-- Returns a flat list: custom_id, job JSON, first-run ms, custom_id, job JSON, first-run ms, ...

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local owner = ARGV[2]
local out = {}
for i = 3, #ARGV do
  local cid = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], cid) == 0 and redis.call('HEXISTS', KEYS[3], cid) == 0 then
    local claim = redis.call('HGET', KEYS[4], cid)
    local free = true
    if claim then
      local holder, expiry = string.match(claim, '^(%S+) (%d+)$')
      if holder ~= owner and tonumber(expiry) > now then free = false end
    end
    if free then
      local job = redis.call('HGET', KEYS[1], cid)
      if job then
        redis.call('HSET', KEYS[4], cid, owner .. ' ' .. (now + lease))
        redis.call('HSETNX', KEYS[5], cid, now)
        out[#out + 1] = cid
        out[#out + 1] = job
        out[#out + 1] = redis.call('HGET', KEYS[5], cid)
      end
    end
  end
end
return out
