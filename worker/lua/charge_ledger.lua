-- charge_ledger.lua: the account-wide running totals of what every worker sent on one
-- (account, model), priced under each charge rule (worker/ledger.py, worker/chargerule.py).
--
-- Key schema: KEYS[1] = keys.charge_ledger(account, model), a hash:
--   n    requests recorded (a sequence number: only ever grows)
--   sum  their charges under the sum rule (prompt + n x max output)
--   max  their charges under the max rule (max(prompt, n x max output))
--
-- ARGV[1] requests to add (1 for a send, 0 for a refund)
-- ARGV[2] sum-rule tokens to add (negative for a refund: the server did not charge a 429)
-- ARGV[3] max-rule tokens to add
-- ARGV[4] ms to keep the hash after this call
-- Returns {n, sum, max} after the change.

local n = redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])
local s = redis.call('HINCRBY', KEYS[1], 'sum', ARGV[2])
local m = redis.call('HINCRBY', KEYS[1], 'max', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {n, s, m}
