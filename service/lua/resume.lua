-- Drop what older attempts reported after the checkpoint this attempt resumed from.
-- KEYS: job, events, metrics
-- ARGV: attempt, step
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return false end
local step = tonumber(ARGV[2])
local attempt = tonumber(ARGV[1])
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf')
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local pruned = 0
for _, entry in ipairs(entries) do
  local f = entry[2]
  local t, a, s
  for i = 1, #f, 2 do
    if f[i] == 't' then t = f[i + 1] elseif f[i] == 'a' then a = f[i + 1]
    elseif f[i] == 's' then s = f[i + 1] end
  end
  if t ~= 'state' and t ~= 'resume' and tonumber(a) < attempt and tonumber(s) > step then
    redis.call('XDEL', KEYS[2], entry[1])
    pruned = pruned + 1
  end
end
redis.call('HSET', KEYS[1], 'step', ARGV[2])
return {removed, pruned, redis.call('ZRANGE', KEYS[3], 0, -1)}
