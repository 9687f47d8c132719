-- budget_reserve: hold a job's worst-case cost against its batch's and the day's budget, or refuse.
--
-- KEYS[1]  batch budgets hash: "<batch_id>:limit" | ":spent" | ":reserved" (nano-USD, integers)
-- KEYS[2]  days hash: "limit" (the daily budget set at run time), "<day>:spent" | ":reserved"
-- KEYS[3]  held reservations sorted set: member -> expiry (ms since epoch, Redis's clock)
-- KEYS[4]  held reservations hash: member -> "<batch_id> <day> <amount>"
-- KEYS[5]  blocked hash: batch_id -> "batch" | "daily" (why its dispatch stopped; read by status)
-- ARGV[1]  batch_id   ARGV[2] member (unique per call)   ARGV[3] amount (nano-USD)
-- ARGV[4]  ttl in ms: a reservation a crashed worker never settled is released after it
-- ARGV[5]  daily budget of the worker's environment (nano-USD; -1: none), used when KEYS[2] has no "limit"
-- day = whole UTC days since the epoch, by Redis's clock (one clock for every worker).
-- Admits when spent + reserved + amount <= limit for both scopes (a scope with no limit always
-- admits). Returns {1, day} when held, {0, scope, reserved} when refused (reserved: what others
-- hold in that scope, so the caller knows whether a settle may soon make room).

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = tostring(math.floor(tonumber(t[1]) / 86400))

-- Expired reservations (their worker died mid-call) give their amounts back first.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 100)
for _, member in ipairs(expired) do
  local held = redis.call('HGET', KEYS[4], member)
  if held then
    local b, d, a = string.match(held, '^(%S+) (%S+) (%S+)$')
    redis.call('HINCRBY', KEYS[1], b .. ':reserved', 0 - tonumber(a))  -- never -0: not an integer to Redis
    redis.call('HINCRBY', KEYS[2], d .. ':reserved', 0 - tonumber(a))
    redis.call('HDEL', KEYS[4], member)
  end
  redis.call('ZREM', KEYS[3], member)
end

local batch, amount = ARGV[1], tonumber(ARGV[3])
local function num(key, field) return tonumber(redis.call('HGET', key, field) or '0') end

local batch_limit = redis.call('HGET', KEYS[1], batch .. ':limit')
if batch_limit then
  local reserved = num(KEYS[1], batch .. ':reserved')
  if num(KEYS[1], batch .. ':spent') + reserved + amount > tonumber(batch_limit) then
    redis.call('HSET', KEYS[5], batch, 'batch')
    return {0, 'batch', reserved}
  end
end
local daily_limit = tonumber(redis.call('HGET', KEYS[2], 'limit') or ARGV[5])
if daily_limit >= 0 then
  local reserved = num(KEYS[2], day .. ':reserved')
  if num(KEYS[2], day .. ':spent') + reserved + amount > daily_limit then
    redis.call('HSET', KEYS[5], batch, 'daily')
    return {0, 'daily', reserved}
  end
end

redis.call('HINCRBY', KEYS[1], batch .. ':reserved', amount)
redis.call('HINCRBY', KEYS[2], day .. ':reserved', amount)
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[4]), ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], batch .. ' ' .. day .. ' ' .. ARGV[3])
redis.call('HDEL', KEYS[5], batch)
return {1, day}
