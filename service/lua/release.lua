-- Release held jobs (queued, not published: their owner was at its device limit) that fit
-- now, in queue order; an owner's jobs stay in order (one that does not fit holds back the
-- owner's later ones). Drops entries of jobs no longer queued (cancelled, deleted).
-- KEYS: held
-- ARGV: job key prefix, owner key prefix (`{p}:owner:`), max_devices (0: no limit)
-- Returns {id, attempt, queue, ...} of the released jobs: publish them.
-- requires: lib.lua (devices_in_use)
local max_devices = tonumber(ARGV[3]) or 0
local released, blocked = {}, {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local job = ARGV[1] .. id
  local rec = redis.call('HMGET', job, 'state', 'held', 'owner', 'devices', 'attempt', 'queue')
  if rec[1] ~= 'queued' or rec[2] ~= '1' then
    redis.call('ZREM', KEYS[1], id)
  elseif not blocked[rec[3]] then
    local fits = max_devices == 0
    if not fits then
      local in_use = devices_in_use(ARGV[2] .. rec[3] .. ':jobs:', ARGV[1])
      fits = in_use + (tonumber(rec[4]) or 1) <= max_devices
    end
    if fits then
      redis.call('HSET', job, 'held', '0')
      redis.call('ZREM', KEYS[1], id)
      table.insert(released, id)
      table.insert(released, rec[5])
      table.insert(released, rec[6] or '')
    else
      blocked[rec[3]] = true
    end
  end
end
return released
