-- Reactions: a fixed set of taps, counted room-wide in one hash. Taps are not logged: each
-- accepted tap publishes the room's cumulative counts as an ephemeral `reactions` message and
-- every node coalesces those into at most one frame per tally interval.

local function reaction_counts(R)
  local counts = {}
  local flat = redis.call('HGETALL', R.prefix .. 'reactions')
  for i = 1, #flat, 2 do counts[flat[i]] = tonumber(flat[i + 1]) end
  return counts
end

-- args: prefix, channel, maxlen, room, user, reaction, rate, burst
local function react(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local refusal = participation_refusal(R, args[5], now)
  if refusal then return refusal end
  local ok, retry = take_token(R.prefix .. 'rl:react:' .. args[5], tonumber(args[7]),
                               tonumber(args[8]), now)
  if not ok then return err('rate_limited', {retry_ms = retry}) end
  redis.call('HINCRBY', R.prefix .. 'reactions', args[6], 1)
  local counts = reaction_counts(R)
  publish_ephemeral(R, {type = 'reactions', counts = counts})
  return cmsgpack.pack({reaction = args[6], count = counts[args[6]]})
end

register('react', react)
