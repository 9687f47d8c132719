-- reconcile.lua: correct one (account, model) bucket after a response.
--
-- Key schema: KEYS[1] = worker.keys.bucket_key(account, model), a hash (see reserve.lua):
--   rl/rt request level and its time (µs), tl/tt token level and its time (µs), nb not-before (ms).
--   Missing = full bucket, nb = 0.
--
-- Refills both levels to now, adds the deltas (positive = refund, negative = extra charge; a level
-- never rises above capacity), then lowers a level to at most the server's reported remaining.
-- The server's figure never raises a level: ours also carries reservations it has not seen yet.
--
-- ARGV[1] rpm   ARGV[2] tpm   ARGV[3] burst_seconds
-- ARGV[4] token_delta   ARGV[5] request_delta
-- ARGV[6] server remaining tokens (-1 = unknown)   ARGV[7] server remaining requests (-1 = unknown)
-- Returns {now_us, request_level, token_level, nb_ms, request_capacity, token_capacity};
-- levels and capacities as strings (Redis would truncate Lua floats).

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local rpm, tpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token_delta, request_delta = tonumber(ARGV[4]), tonumber(ARGV[5])
local rem_t, rem_r = tonumber(ARGV[6]), tonumber(ARGV[7])
-- KEYS[2] (optional): the pair's learned window (limiter.window_key; set_window.lua), which
-- replaces ARGV[3]'s burst_seconds: every worker sizes the bucket the same at once.
if KEYS[2] then
  local learned = redis.call('GET', KEYS[2])
  if learned then burst = tonumber(learned) end
end
local rate_r, rate_t = rpm / 60, tpm / 60
local cap_r, cap_t = rate_r * burst, rate_t * burst

local h = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'nb')

local function refill(level, ts, cap, rate)
  if not level then return cap end
  local elapsed = math.max(0, now_us - tonumber(ts)) / 1e6
  return math.min(cap, tonumber(level) + rate * elapsed)
end

local lr = math.min(cap_r, refill(h[1], h[2], cap_r, rate_r) + request_delta)
local lt = math.min(cap_t, refill(h[3], h[4], cap_t, rate_t) + token_delta)
if rem_r >= 0 then lr = math.min(lr, rem_r) end
if rem_t >= 0 then lt = math.min(lt, rem_t) end
local nb = tonumber(h[5] or 0)

local now_s = string.format('%.17g', now_us)
redis.call('HSET', KEYS[1], 'rl', string.format('%.17g', lr), 'rt', now_s,
  'tl', string.format('%.17g', lt), 'tt', now_s)
local full = math.max((cap_r - lr) / rate_r, (cap_t - lt) / rate_t, (nb * 1000 - now_us) / 1e6, 0)
redis.call('PEXPIRE', KEYS[1], math.ceil(full * 1000) + 1000)

return {now_us, string.format('%.17g', lr), string.format('%.17g', lt), nb,
  string.format('%.17g', cap_r), string.format('%.17g', cap_t)}
