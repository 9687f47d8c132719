-- charge_ledger.lua: the account-wide running totals of what every worker sent on one
-- (account, model), in terms from which the charge under every candidate rule follows
-- (worker/ledger.py Terms, worker/chargerule.py).
--
-- Key schema: KEYS[1] = keys.charge_ledger(account, model), a hash:
--   n         requests recorded (a sequence number: only ever grows)
--   sum, max  requests that named their max output: their charges under the sum / max rule, n counted
--   sum1, max1                                      ... the same, n not counted
--   dprompt   requests that named no max output: their prompt tokens
--   dchoices  ... their choices (n counted); dprompts: their number (n not counted)
--
-- ARGV[1] ms to keep the hash after this call
-- ARGV[2] requests to add (1 per send, 0 for a refund)
-- ARGV[3..] the term increments, in the order above (negative for a refund: a 429 was not charged)
-- Returns {n, sum, max, sum1, max1, dprompt, dchoices, dprompts} after the change.

local terms = {'sum', 'max', 'sum1', 'max1', 'dprompt', 'dchoices', 'dprompts'}
local out = {redis.call('HINCRBY', KEYS[1], 'n', ARGV[2])}
for i, name in ipairs(terms) do
  out[i + 1] = redis.call('HINCRBY', KEYS[1], name, ARGV[i + 2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return out
