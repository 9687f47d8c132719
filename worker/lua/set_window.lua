-- set_window.lua: adopt the server's window for one (account, model) bucket, once for all workers.
--
-- KEYS[1] = worker.keys.bucket_key(account, model) (see reserve.lua)
-- KEYS[2] = limiter.window_key(KEYS[1]): the learned window, seconds of limit (a string; no expiry)
-- ARGV[1] rpm   ARGV[2] tpm   ARGV[3] burst_seconds in force when nothing was learned yet
-- ARGV[4] the window read off the server's answer
-- ARGV[5] widen tolerance (0.1: up to a tenth more, keep)   ARGV[6] shrink tolerance (0.01)
--
-- Several workers read the same headers at about the same time: the first one's change is made,
-- the others find it already there (within the tolerance) and change nothing.
--
-- Resizing keeps what was used: a bucket's level is its capacity less the usage not yet refilled,
-- and that usage is the same whatever the capacity (both refill at the limit's rate), so the new
-- level is the old one plus the change of capacity. Widening so adds the refill the larger bucket
-- would have banked (the server's opening allowance is spendable at once); shrinking takes off
-- what the smaller bucket never held. Capping the old level at the new capacity instead forgot
-- the requests sent within the last second: 5 s of burst shrunk to 1 s while 400 tokens were in
-- flight left our bucket 400 tokens above the server's, and the next burst drew a 429 (whose
-- share cut then cost ~6% of the limit for ~10 s). The level never goes below empty on a
-- shrink (a debt already there is kept): the server refuses rather than owe, so what overran
-- the smaller bucket was never charged there.
-- Returns the window in force afterwards (a string).

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = tonumber(redis.call('GET', KEYS[2]) or ARGV[3])
local new, widen_tol, shrink_tol = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if new >= stored * (1 - shrink_tol) and new <= stored * (1 + widen_tol) then
  return string.format('%.17g', stored)
end

local rate_r, rate_t = rpm / 60, tpm / 60
local h = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'nb', 'bw')
-- The burst the levels were sized by (reserve.lua's bw): a reservation may already have used it.
local old = tonumber(h[6] or stored)
local function resize(level, ts, rate)
  local cap_old, cap_new = rate * old, rate * new
  if not level then return cap_new end
  local elapsed = math.max(0, now_us - tonumber(ts)) / 1e6
  local held = math.min(cap_old, tonumber(level) + rate * elapsed)
  return math.min(cap_new, math.max(held + cap_new - cap_old, math.min(held, 0)))
end
local lr = resize(h[1], h[2], rate_r)
local lt = resize(h[3], h[4], rate_t)

redis.call('SET', KEYS[2], string.format('%.17g', new))
local now_s = string.format('%.17g', now_us)
redis.call('HSET', KEYS[1], 'rl', string.format('%.17g', lr), 'rt', now_s,
  'tl', string.format('%.17g', lt), 'tt', now_s, 'bw', string.format('%.17g', new))
local nb_wait = (tonumber(h[5] or 0) * 1000 - now_us) / 1e6
local full = math.max((rate_r * new - lr) / rate_r, (rate_t * new - lt) / rate_t, nb_wait, 0)
redis.call('PEXPIRE', KEYS[1], math.ceil(full * 1000) + 1000)
return string.format('%.17g', new)
