-- set_not_before.lua: forbid sending on one (account, model) bucket for a while (after a 429).
--
-- Key schema: KEYS[1] = worker.keys.bucket_key(account, model), a hash (see reserve.lua);
--   only nb is written: not-before, ms since epoch (Redis clock). Levels are left alone.
--
-- nb = max(nb, now + delay): a shorter delay never shortens an earlier, longer one.
-- The hash is kept alive at least until nb has passed.
--
-- ARGV[1] delay (ms, integer >= 0)
-- Returns nb (ms since epoch).

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local nb = math.max(tonumber(redis.call('HGET', KEYS[1], 'nb') or 0), now_ms + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'nb', string.format('%d', nb))

local keep = nb - now_ms + 1000
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
return nb
