-- Room-wide reads and the settle pass, then the library's registrations.

local function settle(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local settled = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', R.prefix .. 'open_lots', '-inf', now)) do
    local L = load_lot(R, id)
    if L and L.status == 'open' then
      settle_lot(R, L, 'time', now)
      settled = settled + 1
    else
      redis.call('ZREM', R.prefix .. 'open_lots', id)
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', R.prefix .. 'open_polls', '-inf', now)) do
    local P = load_poll(R, id)
    if P and P.status == 'open' then
      close_poll(R, P, 'time', now)
      settled = settled + 1
    else
      redis.call('ZREM', R.prefix .. 'open_polls', id)
    end
  end
  return {settled, touch_active(R)}
end

local function head(keys, args)
  local R = room_ctx(keys, args)
  local ep = ensure_epoch(R)
  return {ep, tonumber(redis.call('GET', R.prefix .. 'seq') or '0'), now_ms()}
end

-- args: prefix, channel, maxlen, room, max lots, max polls
local function snapshot(keys, args)
  local R = room_ctx(keys, args)
  local lots, polls = {}, {}
  for _, id in ipairs(redis.call('LRANGE', R.prefix .. 'lots', -tonumber(args[5]), -1)) do
    lots[#lots + 1] = public_lot(load_lot(R, id))
  end
  for _, id in ipairs(redis.call('LRANGE', R.prefix .. 'polls', -tonumber(args[6]), -1)) do
    polls[#polls + 1] = public_poll(load_poll(R, id))
  end
  return cmsgpack.pack({epoch = ensure_epoch(R),
                        offset = tonumber(redis.call('GET', R.prefix .. 'seq') or '0'),
                        lots = lots, polls = polls, server_ts = now_ms()})
end

-- args: prefix, channel, maxlen, room, the epoch the caller saw
-- The room log lost its newest events (a primary died before its replica had them, and the
-- replica took over): a node saw it and asks for a new epoch, so every node and client
-- resyncs instead of mistaking the new events for ones it already has. Once per loss: a caller
-- with an older epoch just learns the current one.
local function rotate_epoch(keys, args)
  local R = room_ctx(keys, args)
  local ep = ensure_epoch(R)
  if ep == args[5] then
    local t = redis.call('TIME')
    ep = t[1] .. string.format('%06d', tonumber(t[2]))
    if ep == args[5] then ep = ep .. 'r' end
    redis.call('SET', R.prefix .. 'epoch', ep)
  end
  return ep
end

register('rotate_epoch', rotate_epoch)
register('bid', bid)
register('lot_create', lot_create)
register('lot_open', lot_open)
register('lot_extend', lot_extend)
register('lot_close', lot_close)
register('poll_open', poll_open)
register('vote', vote)
register('poll_close', poll_close)
register('settle', settle)
register('head', head)
register('snapshot', snapshot)
register('tallies', tallies)
