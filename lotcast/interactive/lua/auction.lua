-- Lots: create, open, extend, close, bid, settle. One lot hash per lot; the room log gets every
-- state change. Rules are documented in docs/protocol.md ("Auction rules").

local LOT_NUMBERS = {'start_price', 'reserve', 'buy_now', 'duration_ms', 'soft_close_ms',
                     'ends_at', 'price', 'lmax', 'bids'}

local function lot_key(R, id) return R.prefix .. 'lot:' .. id end

local function load_lot(R, id)
  local L = hash(lot_key(R, id))
  if not L then return nil end
  for _, f in ipairs(LOT_NUMBERS) do L[f] = tonumber(L[f]) end
  L.incs = cmsgpack.unpack(L.increments)
  return L
end

local function increment_at(incs, p)
  local step = incs[1][2]
  for i = 1, #incs do
    if incs[i][1] <= p then step = incs[i][2] else break end
  end
  return step
end

local function next_min(L)
  if not L.leader then return L.start_price end
  return L.price + increment_at(L.incs, L.price)
end

local function reserve_met(L)
  if L.reserve == 0 then return true end
  return L.leader ~= nil and L.price >= L.reserve
end

local function public_lot(L)
  local p = {lot = L.id, title = L.title, status = L.status, start_price = L.start_price,
             increments = L.incs, has_reserve = L.reserve > 0, reserve_met = reserve_met(L),
             duration_ms = L.duration_ms, soft_close_ms = L.soft_close_ms,
             next_min = next_min(L), bids = L.bids}
  if L.buy_now > 0 then p.buy_now = L.buy_now end
  if L.ends_at then p.ends_at = L.ends_at end
  if L.leader then
    p.price = L.price
    p.leader = L.leader
    p.leader_name = L.leader_name
  end
  if L.winner then
    p.winner = L.winner
    p.winner_name = L.winner_name
  end
  if L.reason then p.reason = L.reason end
  return p
end

-- Decides the lot's outcome once: callers only reach here while status == 'open'.
local function settle_lot(R, L, by, now)
  redis.call('ZREM', R.prefix .. 'open_lots', L.id)
  touch_active(R)
  if L.leader and (by == 'buy_now' or reserve_met(L)) then
    L.status = 'sold'
    L.winner = L.leader
    L.winner_name = L.leader_name
    redis.call('HSET', lot_key(R, L.id), 'status', 'sold', 'winner', L.leader,
               'winner_name', L.leader_name)
    return emit(R, {type = 'lot_sold', lot = L.id, winner = L.leader,
                    winner_name = L.leader_name, price = L.price, by = by}, now)
  end
  local reason = L.leader and 'reserve_not_met' or 'no_bids'
  L.status = 'unsold'
  L.reason = reason
  redis.call('HSET', lot_key(R, L.id), 'status', 'unsold', 'reason', reason)
  return emit(R, {type = 'lot_unsold', lot = L.id, reason = reason, by = by}, now)
end

local function place_bid(R, L, user, name, amount, maxb, now, rate, burst)
  if L.status == 'draft' then return err('lot_not_open', {state = 'draft'}) end
  if L.status ~= 'open' then return err('lot_closed', {state = L.status}) end
  if now >= L.ends_at then
    settle_lot(R, L, 'time', now)
    return err('lot_ended', {ends_at = L.ends_at})
  end
  -- Only bids on an open lot count against the user's rate limit.
  local ok, retry = take_token(R.prefix .. 'rl:bid:' .. user, rate, burst, now)
  if not ok then return nil, err('rate_limited', {retry_ms = retry}) end
  local minimum = next_min(L)
  -- The amount is kept so a replay of this answer for the same idempotency key is exact.
  if amount < minimum then return err('bid_too_low', {min = minimum, amount = amount}) end
  if maxb < amount then maxb = amount end
  local status = 'winning'
  local bought = false
  if L.buy_now > 0 and L.bids == 0 and amount >= L.buy_now then
    L.price, L.leader, L.leader_name, L.lmax = L.buy_now, user, name, L.buy_now
    status, bought = 'bought', true
  elseif not L.leader then
    L.price, L.leader, L.leader_name, L.lmax = amount, user, name, maxb
  elseif L.leader == user then
    if maxb > L.lmax then L.lmax = maxb end
  elseif maxb > L.lmax then
    local proxy = math.min(maxb, L.lmax + increment_at(L.incs, L.lmax))
    L.price, L.leader, L.leader_name, L.lmax = math.max(amount, proxy), user, name, maxb
  else
    -- Ties go to the leader: they were first.
    L.price = math.min(L.lmax, maxb + increment_at(L.incs, maxb))
    status = 'outbid'
  end
  if not bought and L.reserve > 0 and L.price < L.reserve and L.lmax >= L.reserve then
    L.price = L.reserve
  end
  L.bids = L.bids + 1
  local extended = false
  if not bought and L.soft_close_ms > 0 and L.ends_at - now <= L.soft_close_ms then
    L.ends_at = now + L.soft_close_ms
    extended = true
    redis.call('ZADD', R.prefix .. 'open_lots', L.ends_at, L.id)
    touch_active(R)
  end
  redis.call('HSET', lot_key(R, L.id), 'price', L.price, 'leader', L.leader,
             'leader_name', L.leader_name, 'lmax', L.lmax, 'bids', L.bids, 'ends_at', L.ends_at)
  local o = emit(R, {type = 'bid', lot = L.id, bidder = user, bidder_name = name, amount = amount,
                     price = L.price, leader = L.leader, leader_name = L.leader_name,
                     next_min = next_min(L), bids = L.bids, reserve_met = reserve_met(L),
                     ends_at = L.ends_at}, now)
  if extended then
    emit(R, {type = 'lot_extended', lot = L.id, ends_at = L.ends_at, by = 'soft_close'}, now)
  end
  if bought then settle_lot(R, L, 'buy_now', now) end
  return cmsgpack.pack({status = status, price = L.price, leader = L.leader,
                        next_min = next_min(L), offset = o})
end

-- args: prefix, channel, maxlen, room, lot, user, name, amount, max, key, rate, burst
-- Returns 'N'..result or 'D'..result (duplicate idempotency key: the stored original result).
local function bid(keys, args)
  local R = room_ctx(keys, args)
  local id, user, name = args[5], args[6], args[7]
  local amount, maxb, key = tonumber(args[8]), tonumber(args[9]), args[10]
  local L = load_lot(R, id)
  if not L then return 'N' .. err('unknown_lot') end
  local idem = R.prefix .. 'idem:' .. id
  local field = user .. '|' .. key
  if key ~= '' then
    local prev = redis.call('HGET', idem, field)
    if prev then return 'D' .. prev end
  end
  local now = now_ms()
  local result, limited = place_bid(R, L, user, name, amount, maxb, now, tonumber(args[11]),
                                    tonumber(args[12]))
  if limited then return 'N' .. limited end  -- not remembered: a retry may succeed
  if key ~= '' then
    redis.call('HSET', idem, field, result)
    redis.call('PEXPIRE', idem, 86400000)
  end
  return 'N' .. result
end

-- args: prefix, channel, maxlen, room, title, start_price, increments (msgpack), reserve, buy_now,
--       duration_ms, soft_close_ms   (0 = no reserve / no buy-it-now)
local function lot_create(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local id = 'L' .. redis.call('HINCRBY', R.prefix .. 'ids', 'lot', 1)
  redis.call('HSET', lot_key(R, id), 'id', id, 'title', args[5], 'status', 'draft',
             'start_price', args[6], 'increments', args[7], 'reserve', args[8],
             'buy_now', args[9], 'duration_ms', args[10], 'soft_close_ms', args[11], 'bids', 0,
             'created', now)
  redis.call('RPUSH', R.prefix .. 'lots', id)
  local ev = public_lot(load_lot(R, id))
  ev.type = 'lot_created'
  local o = emit(R, ev, now)
  return cmsgpack.pack({lot = id, offset = o})
end

local function host_lot(R, id, now)
  local L = load_lot(R, id)
  if not L then return nil, err('unknown_lot') end
  if L.status == 'open' and now >= L.ends_at then
    settle_lot(R, L, 'time', now)
    return nil, err('lot_ended', {ends_at = L.ends_at})
  end
  return L, nil
end

local function lot_open(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local L, e = host_lot(R, args[5], now)
  if not L then return e end
  if L.status ~= 'draft' then return err('invalid_state', {state = L.status}) end
  L.ends_at = now + L.duration_ms
  redis.call('HSET', lot_key(R, L.id), 'status', 'open', 'ends_at', L.ends_at)
  redis.call('ZADD', R.prefix .. 'open_lots', L.ends_at, L.id)
  touch_active(R)
  local o = emit(R, {type = 'lot_opened', lot = L.id, ends_at = L.ends_at,
                     next_min = next_min(L)}, now)
  return cmsgpack.pack({lot = L.id, ends_at = L.ends_at, offset = o})
end

local function lot_extend(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local L, e = host_lot(R, args[5], now)
  if not L then return e end
  if L.status ~= 'open' then return err('invalid_state', {state = L.status}) end
  L.ends_at = L.ends_at + tonumber(args[6])
  redis.call('HSET', lot_key(R, L.id), 'ends_at', L.ends_at)
  redis.call('ZADD', R.prefix .. 'open_lots', L.ends_at, L.id)
  touch_active(R)
  local o = emit(R, {type = 'lot_extended', lot = L.id, ends_at = L.ends_at, by = 'host'}, now)
  return cmsgpack.pack({lot = L.id, ends_at = L.ends_at, offset = o})
end

local function lot_close(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local L, e = host_lot(R, args[5], now)
  if not L then return e end
  if L.status ~= 'open' then return err('invalid_state', {state = L.status}) end
  local o = settle_lot(R, L, 'host', now)
  return cmsgpack.pack({lot = L.id, status = L.status, offset = o})
end
