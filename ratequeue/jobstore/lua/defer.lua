-- defer: park a job until a time by Redis's clock, releasing the worker slot it held.
--
-- KEYS[1]  deferred sorted set: member "<batch_id>\t<custom_id>", score = ms since epoch when due
-- ARGV[1]  member
-- ARGV[2]  delay in ms
-- The newest decision wins: an entry already present takes the new time. Returns the due time (ms).

local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], due, ARGV[1])
return due
