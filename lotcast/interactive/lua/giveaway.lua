-- Giveaways: open (between lots), enter (one entry per user), draw (uniformly at random from the
-- entrants connected at the draw, re-checkable from the logged record), cancel; and the room
-- state the snapshot adds (current giveaway, reaction counts). docs/protocol.md, "Giveaways".

-- SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) on Lua 5.1 with Redis's `bit` library
-- (which exists only while a function runs, not while the library loads: looked up per call).
local band, bxor, bnot, rshift, ror, tobit
local function bitops()
  band, bxor, bnot = bit.band, bit.bxor, bit.bnot
  rshift, ror, tobit = bit.rshift, bit.ror, bit.tobit
end

local K256 = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2}

local function be32(n)  -- a 32-bit word as 4 big-endian bytes
  n = n % 4294967296
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end

local function sha256(msg)  -- binary digest (32 bytes)
  bitops()
  local bits = #msg * 8
  msg = msg .. '\128' .. string.rep('\0', (55 - #msg) % 64)
        .. be32(math.floor(bits / 4294967296)) .. be32(bits)
  local H = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
  for k = 1, 8 do H[k] = tobit(H[k]) end
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local b1, b2, b3, b4 = string.byte(msg, chunk + i * 4, chunk + i * 4 + 3)
      w[i] = tobit(b1 * 16777216 + b2 * 65536 + b3 * 256 + b4)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for i = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = tobit(h + S1 + ch + K256[i + 1] + w[i])
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + tobit(S0 + maj))
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
  end
  local out = {}
  for k = 1, 8 do out[k] = be32(H[k]) end
  return table.concat(out)
end

local function hmac_sha256(key, msg)  -- key <= 64 bytes here (a 32-byte seed)
  bitops()
  key = key .. string.rep('\0', 64 - #key)
  local ipad, opad = {}, {}
  for i = 1, 64 do
    local kb = string.byte(key, i)
    ipad[i] = string.char(bxor(kb, 0x36))
    opad[i] = string.char(bxor(kb, 0x5c))
  end
  return sha256(table.concat(opad) .. sha256(table.concat(ipad) .. msg))
end

local function to_hex(s)
  return (s:gsub('.', function(ch) return string.format('%02x', string.byte(ch)) end))
end

local function from_hex(h)
  return (h:gsub('..', function(pair) return string.char(tonumber(pair, 16)) end))
end

-- The 256-bit big-endian integer `digest` modulo n (n < 2^40 keeps every step exact).
local function mod_digest(digest, n)
  local r = 0
  for i = 1, #digest do r = (r * 256 + string.byte(digest, i)) % n end
  return r
end

local function giveaway_key(R, id) return R.prefix .. 'giveaway:' .. id end

local function current_giveaway(R)
  local id = redis.call('LINDEX', R.prefix .. 'giveaways', -1)
  if not id then return nil end
  return hash(giveaway_key(R, id))
end

-- A lot that is open and not yet past its end time, if any (the giveaway rules refuse then).
local function open_lot_now(R, now)
  local due = redis.call('ZRANGEBYSCORE', R.prefix .. 'open_lots', '(' .. now, '+inf',
                         'LIMIT', 0, 1)
  return due[1]
end

local function public_giveaway(R, G)
  local p = {giveaway = G.id, item = G.item, status = G.status, commitment = G.commitment,
             opened_at = tonumber(G.opened_at),
             entrants = redis.call('HLEN', giveaway_key(R, G.id) .. ':entries')}
  if G.status == 'drawn' then
    p.winner, p.winner_name = G.winner, G.winner_name
    p.eligible, p.index, p.seed = tonumber(G.eligible), tonumber(G.index), G.seed
    p.eligible_sha1 = G.eligible_sha1
  end
  return p
end

-- args: prefix, channel, maxlen, room, seed (64 hex chars, from the node's CSPRNG)
local function giveaway_open(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local lot = open_lot_now(R, now)
  if lot then return err('lot_is_open', {lot = lot}) end
  local cur = current_giveaway(R)
  if cur and cur.status == 'open' then
    return err('giveaway_in_progress', {giveaway = cur.id})
  end
  local id = 'G' .. redis.call('HINCRBY', R.prefix .. 'ids', 'giveaway', 1)
  local commitment = to_hex(sha256(from_hex(args[6])))
  redis.call('HSET', giveaway_key(R, id), 'id', id, 'item', args[5], 'status', 'open',
             'seed', args[6], 'commitment', commitment, 'opened_at', now)
  redis.call('RPUSH', R.prefix .. 'giveaways', id)
  local o = emit(R, {type = 'giveaway_opened', giveaway = id, item = args[5],
                     commitment = commitment}, now)
  return cmsgpack.pack({giveaway = id, commitment = commitment, offset = o})
end

local function open_giveaway(R, id)
  local G = hash(giveaway_key(R, id))
  if not G then return nil, err('unknown_giveaway') end
  if G.status ~= 'open' then return nil, err('giveaway_closed', {state = G.status}) end
  return G, nil
end

-- args: prefix, channel, maxlen, room, giveaway, user, name, max entries
local function giveaway_enter(keys, args)
  local R = room_ctx(keys, args)
  local refusal = participation_refusal(R, args[6], now_ms())
  if refusal then return refusal end
  local G, e = open_giveaway(R, args[5])
  if not G then return e end
  local entries = giveaway_key(R, G.id) .. ':entries'
  if redis.call('HEXISTS', entries, args[6]) == 1 then
    return err('duplicate_entry', {giveaway = G.id})
  end
  local count = redis.call('HLEN', entries)
  if count >= tonumber(args[8]) then return err('giveaway_full', {max = tonumber(args[8])}) end
  redis.call('HSET', entries, args[6], args[7])
  return cmsgpack.pack({giveaway = G.id, entrants = count + 1})
end

-- args: prefix, channel, maxlen, room, giveaway, fresh_ms
-- Eligible: entrants in the online set of a node whose room_viewers entry is fresh (that node
-- holds an open session of theirs). Sorted bytewise (a zset of equal scores), the winner is
-- eligible[HMAC-SHA256(seed, giveaway id) mod count] (0-based).
local function giveaway_draw(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local G, e = open_giveaway(R, args[5])
  if not G then return e end
  local lot = open_lot_now(R, now)
  if lot then return err('lot_is_open', {lot = lot}) end
  local fresh = {}
  local views = redis.call('HGETALL', R.prefix .. 'viewers')
  for i = 1, #views, 2 do
    local stamp = tonumber(string.match(views[i + 1], ':(%d+)$') or '0')
    if now - stamp <= tonumber(args[6]) then fresh[#fresh + 1] = R.prefix .. 'online:' .. views[i] end
  end
  local gkey = giveaway_key(R, G.id)
  local eligible = gkey .. ':eligible'
  redis.call('DEL', eligible)
  local entries = redis.call('HGETALL', gkey .. ':entries')
  for i = 1, #entries, 2 do
    for _, online in ipairs(fresh) do
      if redis.call('SISMEMBER', online, entries[i]) == 1 then
        redis.call('ZADD', eligible, 0, entries[i])
        break
      end
    end
  end
  local count = redis.call('ZCARD', eligible)
  if count == 0 then
    return err('no_eligible_entrants', {entrants = #entries / 2})
  end
  local index = mod_digest(hmac_sha256(from_hex(G.seed), G.id), count)
  local winner = redis.call('ZRANGE', eligible, index, index)[1]
  local winner_name = redis.call('HGET', gkey .. ':entries', winner)
  local sorted = redis.call('ZRANGE', eligible, 0, -1)
  local list_sha1 = redis.sha1hex(table.concat(sorted, '\n'))
  redis.call('HSET', gkey, 'status', 'drawn', 'winner', winner, 'winner_name', winner_name,
             'eligible', count, 'index', index, 'eligible_sha1', list_sha1, 'drawn_at', now)
  local o = emit(R, {type = 'giveaway_drawn', giveaway = G.id, item = G.item,
                     entrants = #entries / 2, eligible = count, winner = winner,
                     winner_name = winner_name, seed = G.seed, commitment = G.commitment,
                     index = index, eligible_sha1 = list_sha1}, now)
  return cmsgpack.pack({giveaway = G.id, winner = winner, winner_name = winner_name,
                        eligible = count, entrants = #entries / 2, index = index, offset = o})
end

-- args: prefix, channel, maxlen, room, giveaway
local function giveaway_cancel(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local G, e = open_giveaway(R, args[5])
  if not G then return e end
  redis.call('HSET', giveaway_key(R, G.id), 'status', 'cancelled')
  local o = emit(R, {type = 'giveaway_cancelled', giveaway = G.id, by = 'host'}, now)
  return cmsgpack.pack({giveaway = G.id, offset = o})
end

-- args: prefix, channel, maxlen, room, giveaway, start, page size
local function giveaway_proof(keys, args)
  local R = room_ctx(keys, args)
  local G = hash(giveaway_key(R, args[5]))
  if not G then return err('unknown_giveaway') end
  if G.status ~= 'drawn' then return err('not_drawn', {state = G.status}) end
  local start, size = tonumber(args[6]), tonumber(args[7])
  local users = redis.call('ZRANGE', giveaway_key(R, G.id) .. ':eligible', start,
                           start + size - 1)
  local out = public_giveaway(R, G)
  out.users, out.start = users, start
  if start + #users < out.eligible then out.next = start + #users end
  return cmsgpack.pack(out)
end

-- args: prefix, channel, maxlen, room, user ('' for anonymous)
-- The room state a snapshot adds: the current giveaway (and whether `user` entered it) and the
-- cumulative reaction counts.
local function show_state(keys, args)
  local R = room_ctx(keys, args)
  local out = {reactions = reaction_counts(R)}
  local G = current_giveaway(R)
  if G then
    out.giveaway = public_giveaway(R, G)
    if args[5] ~= '' then
      out.giveaway.entered = redis.call('HEXISTS', giveaway_key(R, G.id) .. ':entries',
                                        args[5]) == 1
    end
  end
  return cmsgpack.pack(out)
end

-- Exposed for the tests of this file's SHA-256 (hex of sha256(arg) and hmac(arg1, arg2)).
local function show_digest(keys, args)
  return {to_hex(sha256(args[1])), to_hex(hmac_sha256(args[2], args[3]))}
end

register('giveaway_open', giveaway_open)
register('giveaway_enter', giveaway_enter)
register('giveaway_draw', giveaway_draw)
register('giveaway_cancel', giveaway_cancel)
register('giveaway_proof', giveaway_proof)
register('show_state', show_state)
redis.register_function{function_name = FN .. 'show_digest', callback = show_digest,
                        flags = {'no-writes'}}
