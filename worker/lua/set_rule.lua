-- set_rule.lua: publish one dimension of the charge rule a worker learned for an (account, model)
-- (worker/rulelearner.py).
--
-- Key schema: KEYS[1] = keys.learned_rules(), a hash, one field per dimension:
--   "<account>:<model>"          -> "sum" | "max"
--   "<account>:<model>|n"        -> "1" | "0" (the output allowance counts n or not)
--   "<account>:<model>|missing"  -> tokens per choice charged for a request without a max output
-- ARGV[1] the field, ARGV[2] the value.
-- Returns 1 when the value changed (the caller logs it: once per change, whichever worker saw it
-- first), 0 when another worker had already published it.

if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
