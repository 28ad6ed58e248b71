-- KEYS: job, lease, active, queued, queue_seq, events
-- ARGV: id, now, maxlen, stream_ttl, owner_prefix
-- requires: lib.lua (set_state, state_event, queue_score)
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'max_attempts', 'step',
                       'checkpoint_step', 'priority')
local state = rec[1]
if not state then redis.call('SREM', KEYS[3], ARGV[1]) return {'gone', ''} end
if state ~= 'running' and state ~= 'cancelling' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {'skip', state}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'alive', ''} end
local attempt = tonumber(rec[2])
redis.call('SREM', KEYS[3], ARGV[1])
if state == 'cancelling' then
  local reason = 'cancelled; the worker was lost while stopping'
  set_state(KEYS[1], ARGV[5], ARGV[1], state, 'cancelled', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'error', reason)
  state_event(KEYS[6], ARGV[3], rec[2], rec[4], ARGV[2], {state='cancelled', reason=reason})
  redis.call('EXPIRE', KEYS[6], ARGV[4])
  return {'cancelled', ''}
end
local max_attempts = tonumber(rec[3])
if attempt >= max_attempts then
  local reason = 'the worker running attempt ' .. attempt .. ' was lost (its lease expired) and '
    .. 'the restart budget of ' .. (max_attempts - 1) .. ' restarts is spent'
  set_state(KEYS[1], ARGV[5], ARGV[1], state, 'failed', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'error', reason)
  state_event(KEYS[6], ARGV[3], rec[2], rec[4], ARGV[2], {state='failed', reason=reason})
  redis.call('EXPIRE', KEYS[6], ARGV[4])
  return {'failed', ''}
end
local next_attempt = attempt + 1
local seq = queue_score(rec[6], redis.call('INCR', KEYS[5]))
redis.call('ZADD', KEYS[4], seq, ARGV[1])
set_state(KEYS[1], ARGV[5], ARGV[1], state, 'queued', ARGV[2])
redis.call('HSET', KEYS[1], 'attempt', next_attempt, 'queued_at', ARGV[2], 'published', '0')
redis.call('HINCRBY', KEYS[1], 'restarts', 1)
local reason = 'the worker running attempt ' .. attempt .. ' was lost (its lease expired); '
  .. 're-queued as attempt ' .. next_attempt
state_event(KEYS[6], ARGV[3], tostring(next_attempt), rec[4], ARGV[2],
            {state='queued', reason=reason, resume_from_step=tonumber(rec[5])})
return {'requeued', tostring(next_attempt)}
