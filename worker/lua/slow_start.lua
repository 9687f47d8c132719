-- slow_start.lua: an answer came back on a pair in slow start (see reserve.lua's sc/st).
--
-- KEYS[1] = limiter.slow_start_key(bucket key), a hash: sc credits, st time of the last change (µs)
-- ARGV[1] credits to add (2 per answer: the window doubles per round trip, as TCP's slow start),
--         or -1 when the server has announced the pair's limits: slow start is over for every worker.
-- Returns the credits now held (as a string).

local DONE = 1e15  -- more credits than any request capacity: reserve.lua then ignores them
local t = redis.call('TIME')
local now_s = string.format('%.17g', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local add = tonumber(ARGV[1])
local credits
if add < 0 then
  credits = DONE
else
  credits = math.min(DONE, tonumber(redis.call('HGET', KEYS[1], 'sc') or 1) + add)
end
redis.call('HSET', KEYS[1], 'sc', string.format('%.17g', credits), 'st', now_s)
redis.call('PEXPIRE', KEYS[1], 600000)
return string.format('%.17g', credits)
