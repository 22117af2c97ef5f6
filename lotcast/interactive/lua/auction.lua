-- Lots: create, open, extend, close, bid, settle. One lot hash per lot; the room log gets every
-- state change. Rules are documented in docs/protocol.md ("Auction rules").

local LOT_NUMBERS = {'start_price', 'reserve', 'buy_now', 'duration_ms', 'soft_close_ms',
                     'ends_at', 'price', 'lmax', 'bids',
                     'sudden_death', 'prebid_seq'}  -- issue 10: pre-bids, sudden death

local function lot_key(R, id) return R.prefix .. 'lot:' .. id end

local function load_lot(R, id)
  local L = hash(lot_key(R, id))
  if not L then return nil end
  for _, f in ipairs(LOT_NUMBERS) do L[f] = tonumber(L[f]) end
  L.incs = cmsgpack.unpack(L.increments)
  -- issue 10: pre-bids, sudden death
  L.sudden = (L.sudden_death or 0) == 1
  L.prebids = redis.call('ZCARD', R.prefix .. 'prebid_order:' .. id)
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
  -- issue 10: pre-bids, sudden death, re-run
  p.sudden_death = L.sudden
  p.prebids = L.prebids
  if L.rerun_of then p.rerun_of = L.rerun_of end
  if L.rerun then p.rerun = L.rerun end
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

local apply_bid  -- defined below place_bid

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
  local status, o = apply_bid(R, L, user, name, amount, maxb, now, false)
  return cmsgpack.pack({status = status, price = L.price, leader = L.leader,
                        next_min = next_min(L), offset = o})
end

-- The proxy-bid rules for one bid of `amount` (>= next_min) with max `maxb` on an open lot:
-- updates L and its hash, logs the `bid` event (and `lot_extended`, `lot_sold` after it).
-- Returns the bidder's status and the bid event's offset. Shared by live bids and pre-bids.
apply_bid = function(R, L, user, name, amount, maxb, now, prebid)
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
  if not bought and not prebid and not L.sudden and L.soft_close_ms > 0
     and L.ends_at - now <= L.soft_close_ms then
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
                     ends_at = L.ends_at, prebid = prebid or nil}, now)
  if extended then
    emit(R, {type = 'lot_extended', lot = L.id, ends_at = L.ends_at, by = 'soft_close'}, now)
  end
  if bought then settle_lot(R, L, 'buy_now', now) end
  return status, o
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
--       duration_ms, soft_close_ms   (0 = no reserve / no buy-it-now), [sudden_death 0|1]
local function lot_create(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local id = 'L' .. redis.call('HINCRBY', R.prefix .. 'ids', 'lot', 1)
  redis.call('HSET', lot_key(R, id), 'id', id, 'title', args[5], 'status', 'draft',
             'start_price', args[6], 'increments', args[7], 'reserve', args[8],
             'buy_now', args[9], 'duration_ms', args[10], 'soft_close_ms', args[11], 'bids', 0,
             'created', now, 'sudden_death', args[12] or 0)
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

-- issue 10 (pre-bids): open a draft lot, then apply its pre-bids in received order with the
-- proxy rules, in this same atomic call. A pre-bid whose max is below the minimum bid by its
-- turn is skipped (it could not have been placed live either).
local function open_draft(R, L, now)
  L.status = 'open'
  L.ends_at = now + L.duration_ms
  redis.call('HSET', lot_key(R, L.id), 'status', 'open', 'ends_at', L.ends_at)
  redis.call('ZADD', R.prefix .. 'open_lots', L.ends_at, L.id)
  touch_active(R)
  local o = emit(R, {type = 'lot_opened', lot = L.id, ends_at = L.ends_at,
                     next_min = next_min(L)}, now)
  local order = R.prefix .. 'prebid_order:' .. L.id
  local prebids = R.prefix .. 'prebids:' .. L.id
  local applied, skipped = 0, 0
  for _, user in ipairs(redis.call('ZRANGE', order, 0, -1)) do
    local pb = cmsgpack.unpack(redis.call('HGET', prebids, user))
    if L.status == 'open' and pb.max >= next_min(L) then
      apply_bid(R, L, user, pb.name, next_min(L), pb.max, now, true)
      applied = applied + 1
    else
      skipped = skipped + 1
    end
  end
  return cmsgpack.pack({lot = L.id, ends_at = L.ends_at, offset = o, prebids = applied,
                        prebids_skipped = skipped})
end

local function lot_open(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local L, e = host_lot(R, args[5], now)
  if not L then return e end
  if L.status ~= 'draft' then return err('invalid_state', {state = L.status}) end
  return open_draft(R, L, now)
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

-- --- issue 10: pre-bids and re-run (registered here; the rest of the library in room.lua) ---

-- args: prefix, channel, maxlen, room, lot, user, name, max, rate, burst
-- One pre-bid per user per draft lot: a new max replaces the user's earlier one and takes its
-- place at the end of the received order; the same max again changes nothing (duplicate).
local function prebid(keys, args)
  local R = room_ctx(keys, args)
  local id, user, name, maxb = args[5], args[6], args[7], tonumber(args[8])
  local now = now_ms()
  local refusal = participation_refusal(R, user, now)
  if refusal then return refusal end
  local L = load_lot(R, id)
  if not L then return err('unknown_lot') end
  if L.status ~= 'draft' then return err('invalid_state', {state = L.status}) end
  if maxb < L.start_price then return err('bid_too_low', {min = L.start_price}) end
  local prebids = R.prefix .. 'prebids:' .. id
  local order = R.prefix .. 'prebid_order:' .. id
  local prev = redis.call('HGET', prebids, user)
  if prev and cmsgpack.unpack(prev).max == maxb then
    return cmsgpack.pack({lot = id, max = maxb, prebids = L.prebids, duplicate = true,
                          offset = tonumber(redis.call('GET', R.prefix .. 'seq') or '0')})
  end
  local ok, retry = take_token(R.prefix .. 'rl:bid:' .. user, tonumber(args[9]),
                               tonumber(args[10]), now)
  if not ok then return err('rate_limited', {retry_ms = retry}) end
  local seq = redis.call('HINCRBY', lot_key(R, id), 'prebid_seq', 1)
  redis.call('HSET', prebids, user, cmsgpack.pack({max = maxb, name = name}))
  redis.call('ZADD', order, seq, user)
  local count = redis.call('ZCARD', order)
  local o = emit(R, {type = 'prebid', lot = id, prebids = count}, now)
  return cmsgpack.pack({lot = id, max = maxb, prebids = count, duplicate = false, offset = o})
end

-- args: prefix, channel, maxlen, room, lot, open (0|1)
-- A fresh draft lot with the terms of an unsold one (once per unsold lot); opened at once when
-- asked.
local function lot_rerun(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local L, e = host_lot(R, args[5], now)
  if not L then return e end
  if L.status ~= 'unsold' then return err('invalid_state', {state = L.status}) end
  if L.rerun then return err('already_rerun', {rerun = L.rerun}) end
  local id = 'L' .. redis.call('HINCRBY', R.prefix .. 'ids', 'lot', 1)
  redis.call('HSET', lot_key(R, id), 'id', id, 'title', L.title, 'status', 'draft',
             'start_price', L.start_price, 'increments', L.increments, 'reserve', L.reserve,
             'buy_now', L.buy_now, 'duration_ms', L.duration_ms,
             'soft_close_ms', L.soft_close_ms, 'bids', 0, 'created', now,
             'sudden_death', L.sudden and 1 or 0, 'rerun_of', L.id)
  redis.call('HSET', lot_key(R, L.id), 'rerun', id)
  redis.call('RPUSH', R.prefix .. 'lots', id)
  local N = load_lot(R, id)
  local ev = public_lot(N)
  ev.type = 'lot_created'
  local o = emit(R, ev, now)
  local out = {lot = id, rerun_of = L.id, status = 'draft', offset = o}
  if args[6] == '1' then
    local opened = cmsgpack.unpack(open_draft(R, N, now))
    out.status, out.ends_at, out.offset = 'open', opened.ends_at, opened.offset
  end
  return cmsgpack.pack(out)
end

register('prebid', prebid)
register('lot_rerun', lot_rerun)
-- --- end issue 10 ---
