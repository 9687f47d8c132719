-- peek.lua: read one (account, model) bucket without changing it (metrics, status).
--
-- Key schema: KEYS[1] = worker.keys.bucket_key(account, model), a hash (see reserve.lua):
--   rl/rt request level and its time (µs), tl/tt token level and its time (µs), nb not-before (ms).
--   Missing = full bucket, nb = 0.
--
-- ARGV[1] rpm   ARGV[2] tpm   ARGV[3] burst_seconds
-- Returns {now_us, request_level, token_level, nb_ms, request_capacity, token_capacity}: levels
-- refilled to now (not written back); levels and capacities as strings.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local rpm, tpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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

return {now_us,
  string.format('%.17g', refill(h[1], h[2], cap_r, rate_r)),
  string.format('%.17g', refill(h[3], h[4], cap_t, rate_t)),
  tonumber(h[5] or 0),
  string.format('%.17g', cap_r), string.format('%.17g', cap_t)}
