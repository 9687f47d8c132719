-- heartbeat: record a worker's beat at Redis's clock, and forget beats older than a bound.
--
-- KEYS[1]  sorted set: worker name -> time of its last beat (s since epoch, Redis's clock)
-- KEYS[2]  hash: worker name -> its metrics address "host:port" (ratequeue.jobstore.heartbeats)
-- ARGV[1]  worker name
-- ARGV[2]  seconds after which a beat is forgotten
-- ARGV[3]  the worker's metrics address, "" when it serves none
-- One clock for every host: a reaper judges another worker's silence by it (worker/reaper.py),
-- so hosts whose clocks disagree do not take each other for dead. A forgotten worker's address
-- goes with its beat: the exporter lists addresses for Prometheus (/sd/workers) until then, so a
-- killed worker is scraped as down for that long. Redis Cluster: two shared keys in one script
-- (like recheck_later.lua), CROSSSLOT there. Returns the time written.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
local forget = now - tonumber(ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', forget, 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return tostring(now)
