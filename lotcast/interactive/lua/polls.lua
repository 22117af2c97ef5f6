-- Polls: open, vote (one per user, atomically), close. Votes are not logged; tallies are
-- published as ephemeral `tally` messages and nodes coalesce them.

local function poll_key(R, id) return R.prefix .. 'poll:' .. id end

local function load_poll(R, id)
  local P = hash(poll_key(R, id))
  if not P then return nil end
  P.ends_at = tonumber(P.ends_at)
  P.opts = cmsgpack.unpack(P.options)
  P.counts = {}
  P.total = 0
  for i = 1, #P.opts do
    local c = tonumber(P['c' .. (i - 1)]) or 0
    P.counts[i] = c
    P.total = P.total + c
  end
  return P
end

local function public_poll(P)
  return {poll = P.id, question = P.question, options = P.opts, status = P.status,
          ends_at = P.ends_at, counts = P.counts, total = P.total}
end

local function close_poll(R, P, by, now)
  P.status = 'closed'
  redis.call('HSET', poll_key(R, P.id), 'status', 'closed')
  redis.call('ZREM', R.prefix .. 'open_polls', P.id)
  touch_active(R)
  return emit(R, {type = 'poll_closed', poll = P.id, counts = P.counts, total = P.total,
                  by = by}, now)
end

-- args: prefix, channel, maxlen, room, question, options (msgpack), duration_ms
local function poll_open(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local id = 'P' .. redis.call('HINCRBY', R.prefix .. 'ids', 'poll', 1)
  local ends_at = now + tonumber(args[7])
  redis.call('HSET', poll_key(R, id), 'id', id, 'question', args[5], 'options', args[6],
             'status', 'open', 'ends_at', ends_at)
  redis.call('RPUSH', R.prefix .. 'polls', id)
  redis.call('ZADD', R.prefix .. 'open_polls', ends_at, id)
  touch_active(R)
  local P = load_poll(R, id)
  local o = emit(R, {type = 'poll_opened', poll = id, question = P.question, options = P.opts,
                     ends_at = ends_at}, now)
  return cmsgpack.pack({poll = id, ends_at = ends_at, offset = o})
end

-- args: prefix, channel, maxlen, room, poll, user, option, rate, burst
local function vote(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local P = load_poll(R, args[5])
  if not P then return err('unknown_poll') end
  if P.status ~= 'open' then return err('poll_closed') end
  if now >= P.ends_at then
    close_poll(R, P, 'time', now)
    return err('poll_closed')
  end
  local user, option = args[6], tonumber(args[7])
  if option >= #P.opts then return err('bad_option', {options = #P.opts}) end
  local ok, retry = take_token(R.prefix .. 'rl:vote:' .. user, tonumber(args[8]),
                               tonumber(args[9]), now)
  if not ok then return err('rate_limited', {retry_ms = retry}) end
  local voters = poll_key(R, P.id) .. ':voters'
  if redis.call('HSETNX', voters, user, option) == 0 then
    return err('duplicate_vote', {option = tonumber(redis.call('HGET', voters, user))})
  end
  P.counts[option + 1] = redis.call('HINCRBY', poll_key(R, P.id), 'c' .. option, 1)
  publish_ephemeral(R, {type = 'tally', poll = P.id, counts = P.counts})
  return cmsgpack.pack({poll = P.id, option = option})
end

local function poll_close(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local P = load_poll(R, args[5])
  if not P then return err('unknown_poll') end
  if P.status ~= 'open' then return err('invalid_state', {state = P.status}) end
  local o = close_poll(R, P, now >= P.ends_at and 'time' or 'host', now)
  return cmsgpack.pack({poll = P.id, offset = o})
end

-- Current counts of every open poll (sent after a resume replay: tallies are not in the log).
local function tallies(keys, args)
  local R = room_ctx(keys, args)
  local out = {}
  for _, id in ipairs(redis.call('ZRANGE', R.prefix .. 'open_polls', 0, -1)) do
    local P = load_poll(R, id)
    if P then out[#out + 1] = {poll = P.id, counts = P.counts} end
  end
  return cmsgpack.pack(out)
end
