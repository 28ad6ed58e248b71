local function set_state(job_key, owner_prefix, id, old, new, now)
  redis.call('HSET', job_key, 'state', new, 'updated_at', now)
  local created = redis.call('HGET', job_key, 'created_ms') or '0'
  redis.call('ZREM', owner_prefix .. old, id)
  redis.call('ZADD', owner_prefix .. new, created, id)
end
local function state_event(stream, maxlen, attempt, step, now, data)
  local e = cjson.encode({type='state', attempt=tonumber(attempt), step=tonumber(step) or 0,
                          time=tonumber(now), data=data})
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
                    't', 'state', 'a', attempt, 's', step or '0', 'e', e)
end
-- The devices an owner's jobs hold (running, cancelling, or queued and released to the
-- workers) and whether one of its queued jobs is held back (`max_devices_per_key`).
local function devices_in_use(owner_prefix, job_prefix)
  local total, held = 0, false
  for _, state in ipairs({'queued', 'running', 'cancelling'}) do
    for _, id in ipairs(redis.call('ZRANGE', owner_prefix .. state, 0, -1)) do
      local rec = redis.call('HMGET', job_prefix .. id, 'devices', 'held')
      if rec[2] == '1' then held = true else total = total + (tonumber(rec[1]) or 1) end
    end
  end
  return total, held
end
-- A job's place in the queue order: its priority's band (high, normal, low: service/queue.py),
-- then first come first served.
local PRIORITY_BANDS = {high = 0, normal = 1, low = 2}
local function queue_score(priority, seq)
  return (PRIORITY_BANDS[priority] or 1) * 10000000000000 + seq
end
