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
