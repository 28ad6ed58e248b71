-- KEYS: job, lease, active, events
-- ARGV: id, attempt, token, new_state, error, now, maxlen, stream_ttl, owner_prefix,
-- then field/value pairs
-- requires: lib.lua (set_state, state_event)
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state', 'step')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[2]) then return 'stale' end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return 'stale' end
if redis.call('GET', KEYS[2]) == ARGV[2] .. ':' .. ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('SREM', KEYS[3], ARGV[1])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], ARGV[9], ARGV[1], rec[2], ARGV[4], ARGV[6])
redis.call('HSET', KEYS[1], 'finished_at', ARGV[6])
local data = {state=ARGV[4]}
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
  data['reason'] = ARGV[5]
end
local step = redis.call('HGET', KEYS[1], 'step') or rec[3]
state_event(KEYS[4], ARGV[7], ARGV[2], step, ARGV[6], data)
redis.call('EXPIRE', KEYS[4], ARGV[8])
return 'ok'
