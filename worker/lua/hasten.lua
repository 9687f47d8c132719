-- hasten.lua: bring deferred jobs forward (worker.backlog.reprice: their schedule was priced by
-- slower limits than those now in force). Never later, never re-adds one already moved back.
--
-- KEYS[1]  deferred sorted set: member "<batch_id>\t<custom_id>", score = ms since epoch when due
-- ARGV     member, delay in ms, member, delay in ms, ...: each is due no later than now + delay
--          (Redis clock, as defer.lua)
-- Returns how many entries were moved.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = 0
for i = 1, #ARGV, 2 do
  -- XX: a member already moved back onto the queue is gone, and stays so; LT: never later.
  moved = moved + redis.call('ZADD', KEYS[1], 'XX', 'LT', 'CH', now + tonumber(ARGV[i + 1]), ARGV[i])
end
return moved
