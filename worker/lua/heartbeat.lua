-- heartbeat: record a worker's beat at Redis's clock, and forget beats older than a bound.
--
-- KEYS[1]  sorted set: worker name -> time of its last beat (s since epoch, Redis's clock)
-- ARGV[1]  worker name
-- ARGV[2]  seconds after which a beat is forgotten
-- One clock for every host: a reaper judges another worker's silence by it (worker/reaper.py),
-- so hosts whose clocks disagree do not take each other for dead. Returns the time written.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return tostring(now)
