-- reserve.lua: reserve capacity for a FIFO batch of requests on one (account, model) bucket.
--
-- Key schema: KEYS[1] = worker.keys.bucket_key(account, model), a hash:
--   rl  request-bucket level (requests; float; negative = debt owed by reservations already granted)
--   rt  time rl was brought up to date (µs since epoch, Redis clock)
--   tl  token-bucket level (tokens; float; may be negative)
--   tt  time tl was brought up to date (µs since epoch)
--   nb  not-before: nothing may be sent before this time (ms since epoch), written after a 429
--   bw  the burst_seconds the levels were last sized by (missing = the burst in force)
-- KEYS[3], only with "slowstart" (below): the pair's slow-start hash (limiter.slow_start_key):
--   sc  credits: requests that may still be granted before more answers come back (missing = 1);
--       slow_start.lua adds 2 per answer (doubling per round trip) and ends slow start
--   st  time sc was last changed (µs since epoch)
-- A missing hash or field means a full bucket and nb = 0. The hash expires once both buckets
-- would be full again and nb has passed, so an idle bucket costs nothing.
--
-- Capacity = limit * burst_seconds / 60, refill = limit / 60 per second, continuous.
-- For each cost c, in order: wait = max((1 - rl)/rate_r, (c - tl)/rate_t, nb - now, 0).
-- If wait <= max(horizon, (c - cap_t)/rate_t, (1 - cap_r)/rate_r) it is granted and debited now;
-- else nothing more is granted and retry_in = wait - that horizon.
--
-- ARGV[1] rpm   ARGV[2] tpm   ARGV[3] burst_seconds   ARGV[4] horizon (µs)
-- ARGV[5] optional: the word "slowstart" while the server has not announced this pair's limits;
--         then at most floor(sc) requests are granted (none for 50 ms when sc < 1), unless
--         sc >= the request capacity (slow start is over). Costs follow it.
-- ARGV[5..] (or ARGV[6..]) costs in tokens (0 <= cost <= tpm), first come first served
-- Returns {now_us, retry_in_us (-1 if all granted), wait_us of each granted request, in order}.
-- Waits are rounded up to whole µs so that no request is ever sent early.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local rpm, tpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local horizon = tonumber(ARGV[4]) / 1e6
-- KEYS[2] (optional): the pair's learned window (limiter.window_key; set_window.lua), which
-- replaces ARGV[3]'s burst_seconds: every worker sizes the bucket the same at once.
if KEYS[2] then
  local learned = redis.call('GET', KEYS[2])
  if learned then burst = tonumber(learned) end
end
local rate_r, rate_t = rpm / 60, tpm / 60
local cap_r, cap_t = rate_r * burst, rate_t * burst
local first = 5
local slow = ARGV[5] == 'slowstart'
if slow then first = 6 end
local SLOW_RETRY_US = 50000  -- slow start waits for answers, not refill: ask again soon
local STALE_CREDIT_US = 10000000  -- credits lost with a killed worker's calls come back after 10 s

-- Validate every cost before writing anything: a batch is all or nothing on bad input.
for i = first, #ARGV do
  local c = tonumber(ARGV[i])
  if c == nil or c < 0 or c > tpm then
    return redis.error_reply('ERR reserve: cost ' .. ARGV[i] .. ' outside [0, tpm]')
  end
end

local h = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'nb', 'bw')
local credits = 0
if slow then
  local s = redis.call('HMGET', KEYS[3], 'sc', 'st')
  credits = tonumber(s[1] or 1)
  if credits >= cap_r then slow = false end
  if credits < 1 and now_us - tonumber(s[2] or 0) > STALE_CREDIT_US then credits = 1 end
end

-- A bucket sized by a larger burst than the one in force now (a worker reserving with the window
-- it just learned, before set_window.lua stored it) keeps what was used, as set_window.lua does:
-- capping the level alone forgot the last second's requests and drew a 429 on the next burst. A
-- larger burst only raises the cap (banking refill is set_window.lua's, once for all workers).
local sized = tonumber(h[6] or burst)
local function refill(level, ts, cap, rate)
  if not level then return cap end
  local elapsed = math.max(0, now_us - tonumber(ts)) / 1e6
  local held = tonumber(level) + rate * elapsed
  if sized > burst then
    held = math.min(rate * sized, held)
    held = math.max(held - rate * (sized - burst), math.min(held, 0))
  end
  return math.min(cap, held)
end

local lr = refill(h[1], h[2], cap_r, rate_r)
local lt = refill(h[3], h[4], cap_t, rate_t)
local nb_wait = math.max(0, (tonumber(h[5] or 0) * 1000 - now_us) / 1e6)
-- A request bucket smaller than one request could otherwise never grant anything.
local min_horizon_r = (1 - cap_r) / rate_r

local out = {now_us, -1}
for i = first, #ARGV do
  local c = tonumber(ARGV[i])
  if slow and credits < 1 then
    out[2] = SLOW_RETRY_US
    break
  end
  local wait = math.max((1 - lr) / rate_r, (c - lt) / rate_t, nb_wait, 0)
  local limit = math.max(horizon, (c - cap_t) / rate_t, min_horizon_r)
  if wait > limit then
    out[2] = math.ceil((wait - limit) * 1e6)
    break
  end
  -- Debit as of the send time: when the wait comes from the other bucket or from nb, refill
  -- beyond what a bucket can hold is lost meanwhile, so it must not be banked for later callers.
  lr = math.min(lr + rate_r * wait, math.max(cap_r, 1)) - 1 - rate_r * wait
  lt = math.min(lt + rate_t * wait, math.max(cap_t, c)) - c - rate_t * wait
  out[#out + 1] = math.ceil(wait * 1e6)
  if slow then credits = credits - 1 end
end

if #out > 2 then
  local now_s = string.format('%.17g', now_us)
  if slow and h[1] and h[3] then
    -- Limits in slow start are a guess (100x too high, say): refilling the shared levels at that
    -- rate wiped the debt of the workers that know the server's limits, and their next burst drew
    -- 22 429s. Only the debit is written; the refill stays with them (the stamps are kept).
    local spent_r, spent_t = 0, 0
    for i = 3, #out do spent_r, spent_t = spent_r + 1, spent_t + tonumber(ARGV[first + i - 3]) end
    redis.call('HSET', KEYS[1], 'rl', string.format('%.17g', tonumber(h[1]) - spent_r),
      'tl', string.format('%.17g', tonumber(h[3]) - spent_t))
    lr, lt = tonumber(h[1]) - spent_r, tonumber(h[3]) - spent_t
  else
    redis.call('HSET', KEYS[1], 'rl', string.format('%.17g', lr), 'rt', now_s,
      'tl', string.format('%.17g', lt), 'tt', now_s, 'bw', string.format('%.17g', burst))
  end
  local full = math.max((cap_r - lr) / rate_r, (cap_t - lt) / rate_t, nb_wait)
  if slow then
    redis.call('HSET', KEYS[3], 'sc', string.format('%.17g', credits), 'st', now_s)
    redis.call('PEXPIRE', KEYS[3], 600000)  -- idle for 10 min: the next start is slow again
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(full * 1000) + 1000)
end
return out
