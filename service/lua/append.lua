-- KEYS: job, events, metrics
-- ARGV: attempt, type, step, event_json, maxlen, metric ('1' to add to the history),
-- then field/value pairs for the record
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return false end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return false end
-- A retry after a lost reply (Redis died after running this): the same event (its JSON has
-- the attempt, step and a microsecond time) is already the last entry; do not add it twice.
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  for i = 1, #last[2], 2 do
    if last[2][i] == 'e' and last[2][i + 1] == ARGV[4] then return last[1] end
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                      't', ARGV[2], 'a', ARGV[1], 's', ARGV[3], 'e', ARGV[4])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return id
