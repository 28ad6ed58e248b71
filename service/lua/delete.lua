-- KEYS: job, config, events, metrics, lease, owner_jobs, idem-or-job
-- ARGV: id, owner_prefix
local rec = redis.call('HMGET', KEYS[1], 'state', 'idem_key')
if not rec[1] then return 'missing' end
if rec[1] ~= 'succeeded' and rec[1] ~= 'failed' and rec[1] ~= 'cancelled' then
  return rec[1]
end
if rec[2] then
  local v = redis.call('GET', rec[2])
  if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then redis.call('DEL', rec[2]) end
end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', ARGV[2] .. rec[1], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 'deleted'
