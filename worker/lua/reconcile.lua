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
-- ARGV[8] rate-limit 429s among the responses corrected here   ARGV[9] those responses (429s too)
--   (only responses to requests sent at the share in force: see worker.runner)
-- ARGV[10], ARGV[11] the requests and tokens the server charged for all the responses corrected
--   here, stale ones too (missing: 0): what the fall of its rooms is compared with
-- ARGV[12] the share of this bucket the worker's limits (ARGV[1], ARGV[2]) were spent at (missing:
--   the share in the hash). A worker a flush behind a change still sends the old one: read at the
--   new one, the server's room looked twice its size after the share doubled (73.8 s on a 60 s
--   server), and the gift sized by it drew 206-228 429s at once (issue 11, 60 s window, sum rule).
-- ARGV[13] seconds since the request whose answer brought the remaining readings went out,
-- ARGV[14] since those counted in ARGV[10] went out, on average (-1 or missing: unknown)
-- Returns {now_us, request_level, token_level, nb_ms, request_capacity, token_capacity, share,
-- guessed}; levels, capacities and share as strings (Redis would truncate Lua floats); guessed 1
-- while the share is still the opening's guess (fg: no window since the opening showed another
-- client or a 429), else 0.
--
-- The share (fields fs: share, fw: start of its current window µs, fa/fr: answers and 429s seen
-- in the window, fl: seconds of limit the server reported left when it began, fm: the most it was
-- seen to hold, fc: the part of a reported remaining a level may hold (CLAIM, doubling per window
-- while alone, up to 1), fn/ft: requests/tokens charged for the window's answers, fq/fk: the server's request
-- and token room when it began (seconds of limit), fx: the room claimed or given not yet seen spent,
-- fz: windows in a row that showed us alone (the share doubles from the second);
-- missing = 1, or OPENING_SHARE on a first remaining read; a window starting now) is the part of
-- the limits the server leaves to this
-- bucket when other clients spend on the account too (issue 11). Levels alone cannot see them: a
-- busy bucket runs in debt (reservations ahead), below any remaining the server reports, while the
-- other client's spending drains the server's bucket, not ours. A rate-limit 429 is what shows it:
-- the server refused what our bucket granted. So once a second (one overrun draws many 429s at
-- once; sooner when 429s abound), shared by every worker through this hash: a window
-- with 429s cuts the share to what was accepted, (1 - refused/answered - 5%) of it, by a tenth at
-- least and by half at most. Without 429s, what the server reports left steers: a buffer (2 s of
-- limit, or half the most it was seen to hold) is kept there to absorb another client's onset
-- while we react; a window in which it runs below the buffer cuts the share before any 429 (by the
-- fraction of the limit it fell per second, halved, from a tenth to 35%, when it fell from near
-- the buffer; a tenth from higher up); otherwise the share grows
-- back within what is left (see growth: 1% of the limit per second at the edge; at once when
-- another client stopped and the server's bucket filled up).
-- The workers multiply their limits by it (worker.learned). A cut scales a debt (negative
-- level) with it, so that it is paid back as soon as before.

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

local refused = tonumber(ARGV[8] or 0)
local h = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'nb', 'fs', 'fw', 'fa', 'fr', 'fl', 'fm', 'fc',
  'ft', 'fq', 'fk', 'fx', 'fn', 'fz', 'fy', 'fu', 'fe', 'fv', 'fg')

local function refill(level, ts, cap, rate)
  if not level then return cap end
  local elapsed = math.max(0, now_us - tonumber(ts)) / 1e6
  return math.min(cap, tonumber(level) + rate * elapsed)
end

local lr = math.min(cap_r, refill(h[1], h[2], cap_r, rate_r) + request_delta)
local lt = math.min(cap_t, refill(h[3], h[4], cap_t, rate_t) + token_delta)
-- CLAIM: a level is lowered to a part of what the server reports left, not all of it: deployments
-- that know nothing of each other (separate Redis) each read the same remaining; claiming all of it,
-- two spent it twice at their opening (issue 11). With 0.4, two leave a fifth of it as a buffer; one
-- alone would leave most of the server's opening allowance unspent: each window that shows nobody
-- else spending (ALONE: less than a tenth of the limit, below) doubles the claim (fc, up to all of
-- it, until others show) and gives the level that part of the room above the buffer.
local CLAIM, ALONE, ALONE_STREAK = 0.4, 0.1, 2
local claim = tonumber(h[12] or CLAIM)
if rem_r >= 0 then lr = math.min(lr, rem_r * claim) end
if rem_t >= 0 then lt = math.min(lt, rem_t * claim) end
local nb = tonumber(h[5] or 0)

local WINDOW_US, MIN_SHARE, SLOW, BUFFER_S, SPREAD_S = 1000000, 0.05, 0.01, 2, 6
-- OPENING_SHARE: the share of a bucket the server has just begun to report on: another deployment
-- may be starting on the same key, and the remaining it reports shows that only a round trip
-- later. Half: two such deployments together spend the limit, no more; one alone grows back to
-- all of it within about a second (the server then reports its room: see growth).
-- SHARE_MEMORY_MS: how long the share (and the window's counts) outlive an idle bucket (a bucket hash
-- otherwise expires once full: a deployment idle for seconds after a cut forgot it and came back at
-- the full limits). A missing level still means a full bucket: a level kept is refilled to now.
local OPENING_SHARE, SHARE_MEMORY_MS, FALL_GAIN = 0.5, 600000, 0.5

-- What the server reports left, in seconds of the full limit (nil when it says nothing).
local function left_s(at)
  local s = nil
  if rem_r >= 0 then s = rem_r / (rate_r / at) end
  if rem_t >= 0 then s = math.min(s or math.huge, rem_t / (rate_t / at)) end
  return s
end

-- What other clients spent in a window, in limits, read off one of the server's two buckets: its
-- room's expected change (refill, up to what it holds: our learned window, or more if it showed
-- more; less what our answers were charged)
-- minus the change seen. Both read off the same answers, one round trip old alike. The bucket
-- that does not bind matters too: a foreign client's small requests drain the request room only,
-- and counting requests against a draining token room (tokens binding) saw others everywhere.
-- `alone` (when known): the room as it would be now had nobody else spent (ALONE_ROOM below);
-- else its refill over the window, less our answers, at most what it holds.
local function others_spent(left, before, ours, seconds, alone)
  if left == nil or before == nil then return -math.huge end
  if alone ~= nil then return (alone - left) / seconds end
  -- Not fm (the most of the two rooms' lower one): a room at its top gains no refill, and one
  -- read at a stale share (0.5 for 1) made fm 72 s on a 60 s server: 0.9 limits 'spent by others'.
  local full = math.max(burst, before, left)
  -- Our spending counted before the cap: a room full at the window's start (our opening drained
  -- it at once) gains a whole window's refill, which hid a foreign client's half of the limit.
  return (math.min(full, before + seconds - ours) - left) / seconds
end

-- Share per second to give back: what the server reports left beyond the buffer, spread over
-- SPREAD_S seconds, so that growing never spends more than it has; at least SLOW from the buffer
-- up (and in a bucket's first window, whose reading predates what this deployment and any other
-- spent since their opening); 0 while what it reports left shrinks (the account is already spent
-- faster than it refills: growing would only run it dry sooner), and 0 below the buffer: a room
-- that stays low without falling is all clients together spending the limit (it would rise
-- otherwise), and probing there only drew 429s (without Retry-After: two deployments and a foreign
-- client at the edge, 1-3 a second for 20 s). Not by what it rose: that reading is a round trip
-- old, so every window would add again what the last one added (measured: two deployments from
-- 0.4 to 0.95 each in four windows, then a 429 storm).
local function growth(left, before, target)
  if left == nil or before == nil then return SLOW end  -- before: the first window says no trend
  if left < before - 0.1 or left < target then return 0 end
  return math.max(SLOW, (left - target) / SPREAD_S)
end

local answered = tonumber(ARGV[9] or 0)
-- When the requests behind this correction went out (Redis clock, µs): the one whose answer
-- brought the readings, and those charged here, on average.
local reading_age, spent_age = tonumber(ARGV[13] or -1), tonumber(ARGV[14] or -1)
local read_us = (reading_age >= 0) and now_us - reading_age * 1e6 or nil
local spent_us = (spent_age >= 0) and now_us - spent_age * 1e6 or nil
local streak = tonumber(h[18] or 0)  -- fz: windows alone in a row
local charged_r, charged_t = tonumber(ARGV[10] or 0), tonumber(ARGV[11] or 0)
local share_in
local share, window, before = tonumber(h[6]), tonumber(h[7] or now_us), tonumber(h[10])
local left
if share == nil then
  -- The worker sent the full limits (no share known yet): what is left is read at 1.
  left = left_s(1)
  share = (left ~= nil) and OPENING_SHARE or 1
  -- The first reading starts the first window's trend: the opening spent after it (not the answer
  -- that brought it) is what the next reading is compared with, a round trip later.
  if left ~= nil then before, charged_r, charged_t = left, 0, 0 end
else
  left = left_s(tonumber(ARGV[12]) or share)
end
share_in = tonumber(ARGV[12]) or share  -- the share the worker's limits were spent at
-- The whole limits, per second (an opening's answers were sent at the full limits: read at 1).
local opening = tonumber(h[6]) == nil and left ~= nil
local full_r, full_t = rate_r / (opening and 1 or share_in), rate_t / (opening and 1 or share_in)
local left_r = (rem_r >= 0) and rem_r / full_r or nil
local left_t = (rem_t >= 0) and rem_t / full_t or nil
local before_r, before_t, given = tonumber(h[14]), tonumber(h[15]), tonumber(h[16] or 0)
-- ALONE_ROOM: the server's two rooms as they would be had nobody but us spent since the window's
-- first reading (fy: when its request went out), in seconds of limit (fe, fv) at fu: refilled
-- between our spending, at most full, our answers taken off when their requests went out. The
-- fall of the rooms is compared with it: a room that sat full while we were idle lost that refill
-- to its top, and counted over the whole window (refill, less our answers, capped at the end)
-- that read as others' spending: a lone route whose deferred work came back at once after a
-- quiet half second saw 0.2-0.36 s of limit a second 'spent by others', and the buffer running
-- dry cut its share by 35% (issue 11: a lone deployment's runs 30-46 s for 30 s of limit).
local first_read, room_at, room_r, room_t = tonumber(h[19]), tonumber(h[20]), tonumber(h[21]), tonumber(h[22])
-- fx: what the claim and the gifts below let us spend that the readings may not show yet (in
-- seconds of limit): our answers pay it off. Reserved ahead, a gift goes out over seconds: the
-- last window's gift alone was too little to hold back (4.8% 429s on a 10 s server window).
-- The opening's window is partial (fz -1): see below.
if opening then before_r, before_t, given, streak = left_r, left_t, CLAIM * left, -1 end
local guessed = opening and 1 or tonumber(h[23] or 0)
if opening and read_us then first_read, room_at, room_r, room_t = read_us, read_us, left_r, left_t end
local function alone_room_to(at)  -- refill ALONE_ROOM to `at` (µs), at most full
  if room_at == nil or at <= room_at then return end
  local refilled = (at - room_at) / 1e6
  if room_r then room_r = math.min(math.max(burst, before_r or 0), room_r + refilled) end
  if room_t then room_t = math.min(math.max(burst, before_t or 0), room_t + refilled) end
  room_at = at
end
if not opening and room_at ~= nil then
  if spent_us then
    alone_room_to(spent_us)
    if room_r then room_r = room_r - charged_r / full_r end
    if room_t then room_t = room_t - charged_t / full_t end
  elseif charged_r > 0 then
    room_at = nil  -- our spending not placed in time: the window is read by its refill alone
  end
end
local most = tonumber(h[11] or 0)
if left ~= nil then most = math.max(most, left) end
-- The buffer kept at the server: what absorbs another client's onset while we react (a round
-- trip and a window). At most half of the most it was seen to hold (a 1 s window holds 1 s).
local target = math.min(BUFFER_S, most / 2)
local seen, refusals = tonumber(h[8] or 0) + answered, tonumber(h[9] or 0) + refused
local requests_seen, tokens_seen = tonumber(h[17] or 0) + charged_r, tonumber(h[13] or 0) + charged_t
-- A window closes after a second, or after a quarter of one when 429s already abound.
if now_us - window >= WINDOW_US or (refusals >= 4 and now_us - window >= WINDOW_US / 4) then
  local seconds = (now_us - window) / 1e6
  -- Alone: the server's rooms fell by no more than our own answers were charged (seen, tokens_seen).
  local alone = false
  -- Our part of all the spending the window shows (ours / (ours + others)): the part of the
  -- room above the buffer this deployment grows into. Each deployment growing by all of it, two
  -- that knew nothing of each other went back to the full limits together when a foreign client
  -- stopped (twice the limit for seconds: 15 429s at the end of a run).
  local split = 1
  if refusals == 0 and seconds > 0 and left ~= nil and before ~= nil then
    local ours_r, ours_t = requests_seen / full_r, tokens_seen / full_t
    given = math.max(0, given - math.max(ours_r, ours_t))
    -- Timed by the readings' requests where both are known (a flush late on a loaded worker is
    -- no refill the server gave), else by the flushes.
    local span, alone_r, alone_t = seconds, nil, nil
    if read_us and room_at and read_us - first_read >= seconds * 5e5 then
      alone_room_to(read_us)
      span, alone_r, alone_t = (read_us - first_read) / 1e6, room_r, room_t
    end
    local others = math.max(others_spent(left_r, before_r, ours_r, span, alone_r),
      others_spent(left_t, before_t, ours_t, span, alone_t))
    -- Evidence needs our own spending in the readings (a tenth of the limit at least): a window
    -- before the opening's answers are back shows nothing spent, by anyone, while it is in flight.
    alone = others < ALONE and math.max(ours_r, ours_t) >= ALONE * seconds
    redis.call('HSET', KEYS[1], 'fo', string.format('%.3f', others))  -- for profiles (bench --profile)
    local ours_ps = math.max(ours_r, ours_t) / seconds
    if ours_ps + math.max(0, others) > 0 then split = ours_ps / (ours_ps + math.max(0, others)) end
    if others > 2 * ALONE then claim = CLAIM end
  end
  -- The window after the opening closes with the first flush a second on: the front of the
  -- opening's answers, whose readings predate most of what this deployment and any other sent in
  -- their openings. Read as evidence, both deployments of a shared key saw themselves alone, went
  -- back to the full limits and each was given the server's room (31 429s in their second
  -- second, without Retry-After). It changes nothing but a cut for 429s.
  local partial = streak < 0
  if refusals > 0 or not (alone or partial) then guessed = 0 end
  streak = (alone and not partial) and streak + 1 or 0
  local give = 0
  if refusals > 0 then
    local accepted = 1 - refusals / math.max(seen, refusals) - 0.05
    local cut = math.max(MIN_SHARE, share * math.min(0.9, math.max(0.5, accepted))) / share
    share = share * cut
    -- A debt (reservations granted ahead, 429s kept charged) is paid back at the new rate: scaled
    -- with it, it takes as long as before, instead of idling every worker for many seconds.
    if lr < 0 then lr = lr * cut end
    if lt < 0 then lt = lt * cut end
  elseif partial then  -- nothing changes (above)
  elseif alone then
    -- The room above the buffer is ours: the claim doubles (a round trip of evidence per window),
    -- and the level is given that part of it, less what was claimed or given before and is not
    -- yet in this reading (fx: its answers are a round trip away, or more when reserved ahead).
    -- The share grows as when the room holds (by the room above the buffer, spread over 6 s),
    -- even while our own spending drains it; it doubles only from the second window alone in a
    -- row (ALONE_STREAK): doubled at once, two deployments that each saw a window alone went back
    -- to the full limits together (8-14% 429s); grown by the room alone, a lone deployment whose
    -- opening had spent the server's room took 50 s from half the limits to all of them (at 1%/s
    -- below the buffer: a 60 s server window's wall 1.08-1.15 of the minimum).
    local climbing = claim < 1
    claim = math.min(1, claim * 2)
    local grown = share + math.max(SLOW, (left - target) / SPREAD_S) * math.min(seconds, 1)
    share = math.min(1, streak >= ALONE_STREAK and math.max(grown, 2 * share) or grown)
    -- Only from well above the buffer: a short window (1 s) refills our level as fast as the
    -- server's room, and a gift on top spent the in-flight part twice (429s). Only while the claim
    -- climbs: a gift is for the room the claim held back (an opening's, or after another client
    -- showed); else our level refills as the server's room does. A gift to a level that had
    -- refilled while idle spent what was in flight twice: 60 s window, 14 requests (13k tokens)
    -- sent at once, a gift sized by the readings of their first answers, 12 429s.
    if climbing and left > 2 * target then give = math.max(0, claim * (left - target) - given) end
    given = given + give
    lr, lt = math.min(cap_r, lr + give * full_r), math.min(cap_t, lt + give * full_t)
    if rem_r >= 0 then lr = math.min(lr, rem_r * claim) end
    if rem_t >= 0 then lt = math.min(lt, rem_t * claim) end
  elseif left ~= nil and before ~= nil and left < target and left < before - 0.1 then
    -- The buffer runs dry: slow down before any 429. From near the buffer, the fall of what is left
    -- (limits per second) is what all clients together spend beyond the limit (another client's
    -- onset): every deployment cutting its share by that fraction cuts their sum by at most the
    -- overspend, so unaware deployments do not over-correct together. From higher up, the fall is
    -- mostly a burst being spent (an opening): a tenth. FALL_GAIN: half of it per window (a burst of
    -- deferred work coming back also makes it fall, once), so a sustained onset is met in two.
    local cut = 0.1
    if before <= 2 * target then
      local fall = (before - left) / math.max(0.25, seconds)
      cut = math.min(0.35, math.max(0.1, fall * FALL_GAIN))
    end
    share = math.max(MIN_SHARE, share * (1 - cut))
  elseif share < 1 then
    share = math.min(1, share + growth(left, before, target) * split * math.min(seconds, 1))
  end
  window, seen, refusals, before, requests_seen, tokens_seen = now_us, 0, 0, left, 0, 0
  before_r, before_t = left_r, left_t
  first_read, room_at, room_r, room_t = read_us, read_us, left_r, left_t
end

local now_s = string.format('%.17g', now_us)
redis.call('HSET', KEYS[1], 'rl', string.format('%.17g', lr), 'rt', now_s,
  'tl', string.format('%.17g', lt), 'tt', now_s)
redis.call('HSET', KEYS[1], 'fs', string.format('%.17g', share), 'fw', string.format('%.17g', window),
  'fa', seen, 'fr', refusals, 'fc', string.format('%.17g', claim), 'fn', requests_seen, 'ft', tokens_seen,
  'fx', string.format('%.17g', given), 'fz', streak, 'fg', guessed)
if before ~= nil then redis.call('HSET', KEYS[1], 'fl', string.format('%.17g', before)) end
if before_r ~= nil then redis.call('HSET', KEYS[1], 'fq', string.format('%.17g', before_r)) end
if before_t ~= nil then redis.call('HSET', KEYS[1], 'fk', string.format('%.17g', before_t)) end
if most > 0 then redis.call('HSET', KEYS[1], 'fm', string.format('%.17g', most)) end
local kept = {fy = first_read, fu = room_at, fe = room_r, fv = room_t}  -- ALONE_ROOM (nil: unknown)
for _, field in ipairs({'fy', 'fu', 'fe', 'fv'}) do
  if room_at and kept[field] then redis.call('HSET', KEYS[1], field, string.format('%.17g', kept[field]))
  else redis.call('HDEL', KEYS[1], field) end
end
local full = math.max((cap_r - lr) / rate_r, (cap_t - lt) / rate_t, (nb * 1000 - now_us) / 1e6, 0)
local ttl_ms = math.ceil(full * 1000) + 1000
ttl_ms = math.max(ttl_ms, SHARE_MEMORY_MS)  -- the share and its window (reserve.lua may shorten it)
redis.call('PEXPIRE', KEYS[1], ttl_ms)

return {now_us, string.format('%.17g', lr), string.format('%.17g', lt), nb,
  string.format('%.17g', cap_r), string.format('%.17g', cap_t), string.format('%.17g', share), guessed}
