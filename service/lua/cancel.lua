-- KEYS: job, queued, events
-- ARGV: id, now, maxlen, stream_ttl, owner_prefix
-- requires: lib.lua (set_state, state_event)
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'step')
local state = rec[1]
if not state then return {'missing', ''} end
if state == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  set_state(KEYS[1], ARGV[5], ARGV[1], 'queued', 'cancelled', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'cancel', '1',
             'cancel_requested_at', ARGV[2], 'error', 'cancelled before it started')
  state_event(KEYS[3], ARGV[3], rec[2], rec[3], ARGV[2],
              {state='cancelled', reason='cancelled before it started'})
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return {'cancelled', state}
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'cancel_requested_at', ARGV[2])
  set_state(KEYS[1], ARGV[5], ARGV[1], 'running', 'cancelling', ARGV[2])
  state_event(KEYS[3], ARGV[3], rec[2], rec[3], ARGV[2], {state='cancelling'})
  return {'cancelling', state}
elseif state == 'cancelling' or state == 'cancelled' then
  return {state, state}
end
return {'finished', state}
