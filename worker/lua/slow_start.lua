-- slow_start.lua: an answer came back on a pair in slow start (see reserve.lua's sc/st).
--
-- KEYS[1] = limiter.slow_start_key(bucket key), a hash: sc credits, st time of the last change (µs)
-- ARGV[1] credits to add (2 per answer: the window doubles per round trip, as TCP's slow start;
--         1 after a 429). A worker ends its own slow start when the server announces the limits
--         to it: the others, who do not know those limits yet, go on with the credits.
-- Returns the credits now held (as a string).

local t = redis.call('TIME')
local now_s = string.format('%.17g', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local credits = tonumber(redis.call('HGET', KEYS[1], 'sc') or 1) + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'sc', string.format('%.17g', credits), 'st', now_s)
redis.call('PEXPIRE', KEYS[1], 600000)
return string.format('%.17g', credits)
