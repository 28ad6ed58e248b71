-- KEYS: job, config, events, queued, queue_seq, owner_jobs, idem, held
-- ARGV: id, owner, name, config_json, now, max_attempts, fingerprint, idem_ttl, maxlen,
-- created_ms, use_idem, owner_prefix, job key prefix, max_active (0: no limit),
-- priority, devices, max_devices (the owner's device limit; 0: none),
-- then field/value pairs written to the new record (e.g. study_id, trial, queue)
-- requires: lib.lua (set_state, state_event, devices_in_use, queue_score)
local function answer(status, id)
  local job_key = ARGV[13] .. id
  return {status, id, redis.call('HGETALL', job_key), redis.call('ZRANK', KEYS[4], id) or -1}
end
if ARGV[11] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    local id = string.sub(existing, 1, sep - 1)
    if string.sub(existing, sep + 1) ~= ARGV[7] then
      return {'conflict', id, {}, -1}
    end
    return answer('existing', id)
  end
end
local limit = tonumber(ARGV[14]) or 0
if limit > 0 then
  -- the owner's queued, running and cancelling jobs, counted in the same script that adds
  -- one: concurrent submits cannot overshoot the limit
  local active = redis.call('ZCARD', ARGV[12] .. 'queued')
    + redis.call('ZCARD', ARGV[12] .. 'running') + redis.call('ZCARD', ARGV[12] .. 'cancelling')
  if active >= limit then return {'limited', tostring(active), {}, -1} end
end
-- over the owner's device limit (or behind one of its jobs that is): held back, not published
local held = '0'
local max_devices = tonumber(ARGV[17]) or 0
if max_devices > 0 then
  local in_use, waiting = devices_in_use(ARGV[12], ARGV[13])
  if waiting or in_use + tonumber(ARGV[16]) > max_devices then held = '1' end
end
local seq = queue_score(ARGV[15], redis.call('INCR', KEYS[5]))
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'name', ARGV[3], 'state', 'queued',
  'attempt', '1', 'max_attempts', ARGV[6], 'restarts', '0', 'created_at', ARGV[5],
  'updated_at', ARGV[5], 'queued_at', ARGV[5], 'created_ms', ARGV[10], 'step', '0',
  'published', '0', 'priority', ARGV[15], 'devices', ARGV[16], 'held', held)
if ARGV[11] == '1' then
  redis.call('HSET', KEYS[1], 'idem_key', KEYS[7])
  redis.call('SET', KEYS[7], ARGV[1] .. ' ' .. ARGV[7], 'EX', ARGV[8])
end
for i = 18, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
if held == '1' then redis.call('ZADD', KEYS[8], seq, ARGV[1]) end
redis.call('ZADD', KEYS[6], ARGV[10], ARGV[1])
redis.call('ZADD', ARGV[12] .. 'queued', ARGV[10], ARGV[1])
state_event(KEYS[3], ARGV[9], '1', '0', ARGV[5], {state='queued'})
return answer('created', ARGV[1])
