-- budget_settle: replace a reservation by the call's actual cost (0 for a failed call: a release).
--
-- KEYS[1..4] as budget_reserve.lua (batch budgets, days, held set, held hash)
-- ARGV[1]  member   ARGV[2] batch_id   ARGV[3] day (as budget_reserve returned it)   ARGV[4] actual cost (nano-USD)
-- A reservation already expired (its call outlived the ttl) was given back by budget_reserve: only
-- the actual cost is added then. Returns 1 if the reservation was still held, else 0.

local held = redis.call('HGET', KEYS[4], ARGV[1])
if held then
  local a = tonumber(string.match(held, '(%S+)$'))
  redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':reserved', 0 - a)  -- never -0 (a free model's 0): not an integer to Redis
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':reserved', 0 - a)
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local actual = tonumber(ARGV[4])
if actual > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':spent', actual)
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':spent', actual)
end
return held and 1 or 0
