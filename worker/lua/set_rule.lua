-- set_rule.lua: publish the charge rule one worker learned for an (account, model).
--
-- Key schema: KEYS[1] = keys.learned_rules(), a hash "<account>:<model>" -> "sum" | "max".
-- ARGV[1] the field, ARGV[2] the rule.
-- Returns 1 when the rule changed (the caller logs it: once per change, whichever worker saw it
-- first), 0 when another worker had already published it.

if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
