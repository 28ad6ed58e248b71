-- KEYS: job, lease
-- ARGV: attempt, token, lease_ms, then optional field/value pairs (progress)
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state', 'cancel')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return {'stale', ''} end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return {'stale', ''} end
local want = ARGV[1] .. ':' .. ARGV[2]
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= want then return {'stale', ''} end
redis.call('SET', KEYS[2], want, 'PX', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {'ok', rec[3] or ''}
