-- Shared helpers for the lotcast Redis Function library (concatenated before the other files).
-- functions.py prepends `local FN = '<library>_'` (every function is registered as FN .. name),
-- `local VERSION = '<n>'` (keys.FUNCTION_VERSION, shared by both libraries)
-- and `local PUBLISH = 'PUBLISH'` ('SPUBLISH' on Redis Cluster: sharded pub/sub).
-- Every function receives keys[1] = the room's seq key (routes the call to the room's slot)
-- and args[1] = room key prefix "lotcast:{room}:", args[2] = pub/sub channel, args[3] = log
-- MAXLEN, args[4] = room id. All other keys are derived from the prefix exactly as
-- lotcast/keys.py spells them, so every key a call touches is in the room's slot.

-- Rolling upgrades: each room belongs to one library version (key `lib`), so two versions never
-- write one room. A write by another version is refused while the room has a lot or poll open
-- (its owner's nodes still serve it); an idle room passes to the version that writes it. The
-- node answers the refusal `unavailable`, and takes the room over itself once the owner's
-- library is gone from Redis (functions.py). Reads (head, snapshot, tallies, ...) are served by
-- any version.
local READS = {head = true, snapshot = true, tallies = true, question_votes = true,
               show_state = true}

local function claim_room(prefix)
  local owner = redis.call('GET', prefix .. 'lib')
  if owner == VERSION then return nil end
  if owner and redis.call('EXISTS', prefix .. 'due') == 1 then
    return redis.error_reply('LOTCAST_LIBRARY ' .. owner .. ' owns this room')
  end
  redis.call('SET', prefix .. 'lib', VERSION)
  return nil
end

local function register(name, fn)
  if READS[name] then
    redis.register_function(FN .. name, fn)
    return
  end
  redis.register_function(FN .. name, function(keys, args)
    local refusal = claim_room(args[1])
    if refusal then return refusal end
    return fn(keys, args)
  end)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hash(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

local function room_ctx(keys, args)
  return {prefix = args[1], channel = args[2], maxlen = args[3], room = args[4]}
end

-- Keep the room's `due` key at its next lot/poll deadline (the node copies it into the global
-- settle index, keys.ACTIVE_ROOMS). Called whenever a deadline appears, moves or goes away.
local function touch_active(R)
  local next_due = -1
  for _, z in ipairs({'open_lots', 'open_polls'}) do
    local first = redis.call('ZRANGE', R.prefix .. z, 0, 0, 'WITHSCORES')
    if #first == 2 and (next_due < 0 or tonumber(first[2]) < next_due) then
      next_due = tonumber(first[2])
    end
  end
  if next_due < 0 then
    redis.call('DEL', R.prefix .. 'due')
  else
    redis.call('SET', R.prefix .. 'due', next_due)
  end
  return next_due
end

local function ensure_epoch(R)
  local ep = redis.call('GET', R.prefix .. 'epoch')
  if not ep then
    local t = redis.call('TIME')
    ep = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', R.prefix .. 'epoch', ep)
  end
  return ep
end

-- Append one event to the room log and publish it. The log is the source of truth; pub/sub only
-- wakes the nodes (they fill gaps from the log).
local function emit(R, ev, now)
  local ep = ensure_epoch(R)
  local o = redis.call('INCR', R.prefix .. 'seq')
  ev.offset = o
  ev.ts = now
  local payload = cmsgpack.pack(ev)
  redis.call('XADD', R.prefix .. 'log', 'MAXLEN', '~', R.maxlen, '0-' .. o, 'e', payload)
  redis.call(PUBLISH, R.channel, ep .. '|' .. payload)
  return o
end

local function publish_ephemeral(R, msg)
  local ep = ensure_epoch(R)
  redis.call(PUBLISH, R.channel, ep .. '|' .. cmsgpack.pack(msg))
end

-- Token bucket per user; rate <= 0 disables it.
local function take_token(key, rate, burst, now)
  if rate <= 0 then return true, 0 end
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  if tokens < 1 then
    return false, math.ceil((1 - tokens) * 1000 / rate)
  end
  redis.call('HSET', key, 'tokens', tokens - 1, 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
  return true, 0
end

local function err(code, extra)
  local r = extra or {}
  r.err = code
  return cmsgpack.pack(r)
end

-- nil when `user` may take part in the room (chat, bid, pre-bid, vote, Q&A, react, enter a
-- giveaway); else the refusal: banned, or muted with until when (lua/moderation.lua sets both).
local function participation_refusal(R, user, now)
  if redis.call('SISMEMBER', R.prefix .. 'banned', user) == 1 then return err('banned') end
  local until_ms = tonumber(redis.call('HGET', R.prefix .. 'muted', user) or '0')
  if until_ms > now then return err('muted', {['until'] = until_ms}) end
  if until_ms > 0 then redis.call('HDEL', R.prefix .. 'muted', user) end
  return nil
end
