-- KEYS: job, lease, queued, active, events
-- ARGV: id, attempt, token, lease_ms, now, maxlen, owner_prefix
-- requires: lib.lua (set_state, state_event)
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'step')
if not rec[1] then return {'gone', ''} end
if tonumber(rec[2]) ~= tonumber(ARGV[2]) then return {'stale', rec[2]} end
-- a repeat of this very call (its reply was lost to a timeout): the lease holds our token
if rec[1] == 'running' and redis.call('GET', KEYS[2]) == ARGV[2] .. ':' .. ARGV[3] then
  return {'started', ''}
end
if rec[1] ~= 'queued' then return {'not-queued', rec[1]} end
local ok = redis.call('SET', KEYS[2], ARGV[2] .. ':' .. ARGV[3], 'NX', 'PX', ARGV[4])
if not ok then return {'leased', ''} end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
set_state(KEYS[1], ARGV[7], ARGV[1], 'queued', 'running', ARGV[5])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[5])
redis.call('HSET', KEYS[1], 'attempt_started_at', ARGV[5], 'worker', ARGV[3])
state_event(KEYS[5], ARGV[6], ARGV[2], rec[3], ARGV[5],
            {state='running', worker=ARGV[3]})
return {'started', ''}
