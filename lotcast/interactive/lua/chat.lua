-- Chat and Q&A (rules in docs/protocol.md, "Chat" and "Q&A"). Concatenated after room.lua:
-- room_snapshot extends room.lua's `snapshot` with the chat, Q&A and moderation state, in the
-- same Function call, so they are consistent with the snapshot's offset.
-- Keys (lotcast/keys.py): chat (list of the newest message ids), chat_msgs (id -> message),
-- chat_deleted (zset: deleted id scored by the offset of its `chat` event, for redacting
-- replays), chat_last (user -> ms of their last message), questions (id -> question),
-- q_open (zset: open question id scored by votes), qv:<id> (set of upvoters).

local CHAT_KEEP = 1000      -- messages a moderator can still delete or mark by id
local CHAT_SNAPSHOT = 100
local QUESTIONS_SNAPSHOT = 100

local function chat_message(R, id)
  local raw = redis.call('HGET', R.prefix .. 'chat_msgs', id)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

-- args: ctx, user, name, token role, text, tokens (" a b c ": the normalized words, each
--       between single spaces), rate, burst
local function chat_post(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local user, name = args[5], args[6]
  local role = effective_role(R, user, args[7])
  if role ~= 'host' then
    local refusal = participation_refusal(R, user, now)
    if refusal then return refusal end
  end
  local conf = hash(R.prefix .. 'chat_conf') or {}
  local slow = tonumber(conf.slow_s or '0')
  if slow > 0 and role ~= 'host' and role ~= 'moderator' then
    local last = tonumber(redis.call('HGET', R.prefix .. 'chat_last', user) or '0')
    local wait = last + slow * 1000 - now
    if wait > 0 then return err('slow_mode', {retry_ms = wait, seconds = slow}) end
  end
  local ok, retry = take_token(R.prefix .. 'rl:chat:' .. user, tonumber(args[10]),
                               tonumber(args[11]), now)
  if not ok then return err('rate_limited', {retry_ms = retry}) end
  if conf.norm then
    for _, word in ipairs(cmsgpack.unpack(conf.norm)) do
      if string.find(args[9], ' ' .. word .. ' ', 1, true) then
        return err('blocked_word', {word = word})
      end
    end
  end
  local id = 'M' .. redis.call('HINCRBY', R.prefix .. 'ids', 'chat', 1)
  local ev = {type = 'chat', id = id, user = user, name = name, role = role, text = args[8]}
  emit(R, ev, now)
  redis.call('HSET', R.prefix .. 'chat_msgs', id, cmsgpack.pack(ev))
  redis.call('HSET', R.prefix .. 'chat_last', user, now)
  if redis.call('RPUSH', R.prefix .. 'chat', id) > CHAT_KEEP then
    redis.call('HDEL', R.prefix .. 'chat_msgs', redis.call('LPOP', R.prefix .. 'chat'))
  end
  return cmsgpack.pack({message = id, offset = ev.offset, ts = now})
end

-- args: ctx, actor, actor name, actor token role, message id
local function chat_delete(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local actor, id = args[5], args[8]
  local role, e = moderation_check(R, actor, args[7], nil)
  if e then return e end
  local m = chat_message(R, id)
  if not m then return err('unknown_message') end
  if (m.role == 'host' or m.role == 'moderator') and role ~= 'host' and m.user ~= actor then
    return err('forbidden', {reason = 'target_moderator'})
  end
  redis.call('HDEL', R.prefix .. 'chat_msgs', id)
  redis.call('LREM', R.prefix .. 'chat', 1, id)
  local gone = R.prefix .. 'chat_deleted'
  redis.call('ZADD', gone, m.offset, id)
  -- entries older than anything a replay can still read are of no use
  local seq = tonumber(redis.call('GET', R.prefix .. 'seq') or '0')
  redis.call('ZREMRANGEBYSCORE', gone, '-inf', '(' .. (seq - 2 * tonumber(R.maxlen)))
  if m.question then
    redis.call('ZREM', R.prefix .. 'q_open', id)
    redis.call('HDEL', R.prefix .. 'questions', id)
    redis.call('DEL', R.prefix .. 'qv:' .. id)
  end
  local o = emit(R, {type = 'chat_deleted', message = id, by = actor, by_name = args[6]}, now)
  return cmsgpack.pack({message = id, offset = o})
end

-- args: ctx, user, name, token role, message id
local function question_mark(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local user, id = args[5], args[8]
  local role = effective_role(R, user, args[7])
  if role ~= 'host' then
    local refusal = participation_refusal(R, user, now)
    if refusal then return refusal end
  end
  local m = chat_message(R, id)
  if not m then return err('unknown_message') end
  if m.user ~= user and role ~= 'host' and role ~= 'moderator' then
    return err('forbidden', {reason = 'not_author'})
  end
  if m.question then return err('invalid_state', {state = 'question'}) end
  m.question = true
  redis.call('HSET', R.prefix .. 'chat_msgs', id, cmsgpack.pack(m))
  redis.call('HSET', R.prefix .. 'questions', id, cmsgpack.pack(
    {question = id, user = m.user, name = m.name, text = m.text, ts = m.ts, offset = m.offset,
     status = 'open'}))
  redis.call('ZADD', R.prefix .. 'q_open', 0, id)
  local o = emit(R, {type = 'question', question = id, user = m.user, name = m.name,
                     text = m.text, by = user, by_name = args[6]}, now)
  return cmsgpack.pack({question = id, offset = o})
end

-- args: ctx, user, token role, question id, rate, burst
local function question_upvote(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  local user, id = args[5], args[7]
  local raw = redis.call('HGET', R.prefix .. 'questions', id)
  if not raw then return err('unknown_question') end
  local Q = cmsgpack.unpack(raw)
  if Q.status ~= 'open' then return err('invalid_state', {state = Q.status}) end
  if Q.user == user then return err('own_question') end
  if effective_role(R, user, args[6]) ~= 'host' then
    local refusal = participation_refusal(R, user, now)
    if refusal then return refusal end
  end
  local ok, retry = take_token(R.prefix .. 'rl:upvote:' .. user, tonumber(args[8]),
                               tonumber(args[9]), now)
  if not ok then return err('rate_limited', {retry_ms = retry}) end
  if redis.call('SADD', R.prefix .. 'qv:' .. id, user) == 0 then
    return err('duplicate_upvote')
  end
  local votes = tonumber(redis.call('ZINCRBY', R.prefix .. 'q_open', 1, id))
  publish_ephemeral(R, {type = 'question_votes', question = id, votes = votes})
  return cmsgpack.pack({question = id, votes = votes})
end

-- args: ctx, actor, actor name, actor token role, question id
local function question_answer(keys, args)
  local R = room_ctx(keys, args)
  local now = now_ms()
  if effective_role(R, args[5], args[7]) ~= 'host' then
    return err('forbidden', {reason = 'not_host'})
  end
  local id = args[8]
  local raw = redis.call('HGET', R.prefix .. 'questions', id)
  if not raw then return err('unknown_question') end
  local Q = cmsgpack.unpack(raw)
  if Q.status ~= 'open' then return err('invalid_state', {state = Q.status}) end
  Q.votes = tonumber(redis.call('ZSCORE', R.prefix .. 'q_open', id) or '0')
  Q.status = 'answered'
  redis.call('ZREM', R.prefix .. 'q_open', id)
  redis.call('DEL', R.prefix .. 'qv:' .. id)
  redis.call('HSET', R.prefix .. 'questions', id, cmsgpack.pack(Q))
  local o = emit(R, {type = 'question_answered', question = id, votes = Q.votes, by = args[5],
                     by_name = args[6]}, now)
  return cmsgpack.pack({question = id, votes = Q.votes, offset = o})
end

local function open_questions(R, limit)
  local out = {}
  local flat = redis.call('ZREVRANGE', R.prefix .. 'q_open', 0, limit - 1, 'WITHSCORES')
  for i = 1, #flat, 2 do
    local raw = redis.call('HGET', R.prefix .. 'questions', flat[i])
    if raw then
      local Q = cmsgpack.unpack(raw)
      Q.votes = tonumber(flat[i + 1])
      out[#out + 1] = Q
    end
  end
  return out
end

-- Votes of every open question, [id, votes, id, votes, ...] (sent after a resume replay:
-- upvote counts are not in the log).
local function question_votes(keys, args)
  local R = room_ctx(keys, args)
  return redis.call('ZREVRANGE', R.prefix .. 'q_open', 0, -1, 'WITHSCORES')
end

-- args: as room.lua's snapshot. The room snapshot plus chat, questions and moderation state.
local function room_snapshot(keys, args)
  local R = room_ctx(keys, args)
  local snap = cmsgpack.unpack(snapshot(keys, args))
  local chat = {}
  for _, id in ipairs(redis.call('LRANGE', R.prefix .. 'chat', -CHAT_SNAPSHOT, -1)) do
    local m = chat_message(R, id)
    if m then
      m.type = nil
      chat[#chat + 1] = m
    end
  end
  snap.chat = chat
  snap.questions = open_questions(R, QUESTIONS_SNAPSHOT)
  for name, value in pairs(moderation_state(R, now_ms())) do snap[name] = value end
  return cmsgpack.pack(snap)
end

register('chat_post', chat_post)
register('chat_delete', chat_delete)
register('question_mark', question_mark)
register('question_upvote', question_upvote)
register('question_answer', question_answer)
register('question_votes', question_votes)
register('room_snapshot', room_snapshot)
