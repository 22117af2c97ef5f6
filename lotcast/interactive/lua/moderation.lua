-- Moderation: moderators granted per room, mutes, bans, slow mode and blocked words (rules in
-- docs/protocol.md, "Moderation"). Concatenated after auction.lua and polls.lua and before
-- room.lua: it wraps `bid` and `vote` before room.lua registers them, so a banned or muted user's
-- bid or vote is refused inside the very Function call that would have accepted it.
-- Keys (lotcast/keys.py): members (user -> token role last seen), mods (user -> granted|revoked),
-- token_mods (set: users seen with a moderator token), muted (user -> until ms), banned (set),
-- chat_conf (slow_s, words, norm).

local function member_role(R, user)
  return redis.call('HGET', R.prefix .. 'members', user) or 'bidder'
end

-- The role a user acts with in this room: the host's token always wins; a grant makes a bidder a
-- moderator, a revoke makes a moderator token act as a plain signed-in user.
local function effective_role(R, user, token_role)
  if token_role ~= 'bidder' and token_role ~= 'moderator' then return token_role end
  local grant = redis.call('HGET', R.prefix .. 'mods', user)
  if grant == 'granted' then return 'moderator' end
  if grant == 'revoked' then return 'bidder' end
  return token_role
end

-- participation_refusal (ban/mute check) lives in common.lua: the show library's Functions
-- (reactions, giveaway entries) and pre-bids need it too.

-- The actor's effective role when they may moderate (and act on `target`, if given).
local function moderation_check(R, actor, actor_token_role, target)
  local role = effective_role(R, actor, actor_token_role)
  if role ~= 'host' and role ~= 'moderator' then
    return nil, err('forbidden', {reason = 'not_moderator'})
  end
  if target then
    local target_role = effective_role(R, target, member_role(R, target))
    if target_role == 'host' then return nil, err('forbidden', {reason = 'target_host'}) end
    if target_role == 'moderator' and role ~= 'host' then
      return nil, err('forbidden', {reason = 'target_moderator'})
    end
  end
  return role, nil
end

local bid_unmoderated = bid
bid = function(keys, args)  -- args[6] = user
  local refusal = participation_refusal(room_ctx(keys, args), args[6], now_ms())
  if refusal then return 'N' .. refusal end
  return bid_unmoderated(keys, args)
end

local vote_unmoderated = vote
vote = function(keys, args)  -- args[6] = user
  local refusal = participation_refusal(room_ctx(keys, args), args[6], now_ms())
  if refusal then return refusal end
  return vote_unmoderated(keys, args)
end

-- A signed-in socket says hello. args: ctx, user, token role
local function member_join(keys, args)
  local R = room_ctx(keys, args)
  local user, token_role = args[5], args[6]
  redis.call('HSET', R.prefix .. 'members', user, token_role)
  if token_role == 'moderator' then redis.call('SADD', R.prefix .. 'token_mods', user) end
  if token_role ~= 'host' and redis.call('SISMEMBER', R.prefix .. 'banned', user) == 1 then
    return err('banned')
  end
  return cmsgpack.pack({role = effective_role(R, user, token_role)})
end

-- args: ctx, actor, actor name, actor token role, action, target user, duration_ms (mute only)
-- action: mute | unmute | ban | unban | grant | revoke
local function moderate(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local actor, actor_name, action, target = args[5], args[6], args[8], args[9]
  local role, e = moderation_check(R, actor, args[7], target)
  if e then return e end
  local ev = {user = target, by = actor, by_name = actor_name}
  local reply = {user = target}
  if action == 'mute' then
    local until_ms = now + tonumber(args[10])
    redis.call('HSET', R.prefix .. 'muted', target, until_ms)
    ev.type, ev['until'], reply['until'] = 'user_muted', until_ms, until_ms
  elseif action == 'unmute' then
    redis.call('HDEL', R.prefix .. 'muted', target)
    ev.type = 'user_unmuted'
  elseif action == 'ban' then
    redis.call('SADD', R.prefix .. 'banned', target)
    ev.type = 'user_banned'
  elseif action == 'unban' then
    redis.call('SREM', R.prefix .. 'banned', target)
    ev.type = 'user_unbanned'
  elseif action == 'grant' or action == 'revoke' then
    if role ~= 'host' then return err('forbidden', {reason = 'not_host'}) end
    redis.call('HSET', R.prefix .. 'mods', target, action == 'grant' and 'granted' or 'revoked')
    ev.type = action == 'grant' and 'moderator_granted' or 'moderator_revoked'
  else
    return redis.error_reply('unknown moderation action ' .. tostring(action))
  end
  reply.offset = emit(R, ev, now)
  return cmsgpack.pack(reply)
end

-- args: ctx, actor, actor name, actor token role, seconds (0 = off)
local function slow_mode(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  if effective_role(R, args[5], args[7]) ~= 'host' then
    return err('forbidden', {reason = 'not_host'})
  end
  local seconds = tonumber(args[8])
  redis.call('HSET', R.prefix .. 'chat_conf', 'slow_s', seconds)
  local o = emit(R, {type = 'slow_mode', seconds = seconds, by = args[5], by_name = args[6]}, now)
  return cmsgpack.pack({seconds = seconds, offset = o})
end

-- args: ctx, actor, actor name, actor token role, words (msgpack list as typed),
--       normalized (msgpack list: each entry's normalized tokens joined by one space)
local function blocked_words(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local _, e = moderation_check(R, args[5], args[7], nil)
  if e then return e end
  redis.call('HSET', R.prefix .. 'chat_conf', 'words', args[8], 'norm', args[9])
  local words = cmsgpack.unpack(args[8])
  local o = emit(R, {type = 'blocked_words', words = words, by = args[5], by_name = args[6]}, now)
  return cmsgpack.pack({count = #words, offset = o})
end

-- The moderation part of a snapshot.
local function moderation_state(R, now)
  local grants = hash(R.prefix .. 'mods') or {}
  local mods = {}
  for user, grant in pairs(grants) do
    if grant == 'granted' then mods[#mods + 1] = user end
  end
  for _, user in ipairs(redis.call('SMEMBERS', R.prefix .. 'token_mods')) do
    if not grants[user] then mods[#mods + 1] = user end
  end
  table.sort(mods)
  local muted = {}
  local flat = redis.call('HGETALL', R.prefix .. 'muted')
  for i = 1, #flat, 2 do
    if tonumber(flat[i + 1]) > now then muted[flat[i]] = tonumber(flat[i + 1]) end
  end
  local banned = redis.call('SMEMBERS', R.prefix .. 'banned')
  table.sort(banned)
  local conf = hash(R.prefix .. 'chat_conf') or {}
  return {moderators = mods, muted = muted, banned = banned,
          slow_mode = tonumber(conf.slow_s or '0'),
          blocked_words = conf.words and cmsgpack.unpack(conf.words) or {}}
end

register('member_join', member_join)
register('moderate', moderate)
register('slow_mode', slow_mode)
register('blocked_words', blocked_words)
