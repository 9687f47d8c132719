-- claim_due: take the deferred entries whose time has come, under a lease.
--
-- KEYS[1]  deferred sorted set: member "<batch_id>\t<custom_id>", score = ms since epoch when due
-- ARGV[1]  maximum number of entries to claim
-- ARGV[2]  lease in ms: claimed entries are pushed this far into the future, so that if the
--          claimer dies before re-enqueueing them they come due again instead of being lost
-- Returns {lease score, member, member, ...}. Once the members are re-enqueued the claimer
-- removes them with release_due.lua, which spares any entry deferred again meanwhile.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leased = now + tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], leased, member)
end
table.insert(due, 1, leased)
return due
