package registry

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

// publishScript publishes backends of one PS. ARGV: ps_id, maxlen, nonce
// (see luaLeaseTaken: "" for none), then quadruples (target, port,
// agent_id, owner). Each entry records the address in the PS's lease, so
// an entry says which instance's address it was published with. It returns, per quadruple, ""
// on success, or the live holder that refuses it: "A" then its agent id
// for another agent, "O" then its agent id for the same agent id under
// another credential (both owners non-empty and different; an entry of an
// older version has no owner and never refuses on that ground). Owners are
// compared only with other PS nodes' entries: on its own PS, a newer
// session of the agent was already admitted by the PS. Liveness is judged
// on Redis's clock.
var publishScript = redis.NewScript(luaServerMS + luaLeaseTaken + `
local p, ps, maxlen = KEYS[1], ARGV[1], ARGV[2]
if lease_taken(p, ps, ARGV[3]) then return redis.error_reply('` + leaseTakenReply + `') end
local now = server_ms()
local addr = redis.call('HGET', p .. ':ps:' .. ps, 'addr')
local res = {}
local n = 0
for i = 4, #ARGV, 4 do
  local target, port, agent, owner = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local rkey = p .. ':route:' .. target
  local holder = ''
  local replaced = nil
  local cur = redis.call('HGETALL', rkey)
  for j = 1, #cur, 2 do
    local other, raw = cur[j], cur[j+1]
    local ok, e = pcall(cjson.decode, raw)
    if ok and type(e) == 'table' then
      local eo = e.owner
      if type(eo) ~= 'string' then eo = '' end
      local why = nil
      if e.agent_id ~= agent then
        why = 'A'
      elseif other ~= ps and eo ~= '' and owner ~= '' and eo ~= owner then
        why = 'O'
      end
      if why and holder == '' then
        local exp = tonumber(redis.call('HGET', p .. ':ps:' .. other, 'expires_ms') or '0') or 0
        if exp > now then holder = why .. tostring(e.agent_id) end
      end
      if other == ps and tostring(e.port) ~= port then
        replaced = tostring(e.port)
      end
    end
  end
  if holder == '' then
    -- Only a publication that takes the target over unindexes the port it
    -- replaces: a refused one leaves the holder's entry and its index
    -- alone, so WithdrawAll and resync still find (and quarantine) it.
    if replaced then redis.call('HDEL', p .. ':psroutes:' .. ps, replaced) end
    local e = {port = tonumber(port), agent_id = agent}
    if owner ~= '' then e.owner = owner end
    if addr then e.addr = addr end
    redis.call('HSET', rkey, ps, cjson.encode(e))
    redis.call('SADD', p .. ':targets', target)
    redis.call('HSET', p .. ':psroutes:' .. ps, port, target)
    redis.call('XADD', p .. ':changes', 'MAXLEN', '~', maxlen, '*', 'k', 'route', 'id', target)
  end
  n = n + 1
  res[n] = holder
end
return res
`)

// withdrawScript removes backends of one PS, first quarantining their ports
// when asked. ARGV: ps_id, maxlen, quarantine_ms ("" for none: how long,
// counted on Redis's clock, the ports stay quarantined), nonce (see
// luaLeaseTaken), then pairs (target, port).
//
// The quarantine of every port in the call is written before any backend
// is removed: Redis does not roll a script back when it fails halfway, so
// this order is what guarantees that no port is ever withdrawn without its
// quarantine. A pair is removed only if the PS's backend for the target
// still has that port, so a late withdraw never removes a newer publication
// (its port is quarantined all the same: the PS gave it up). It returns the
// number of backends removed.
var withdrawScript = redis.NewScript(luaServerMS + luaLeaseTaken + `
local p, ps, maxlen, qfor = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if lease_taken(p, ps, ARGV[4]) then return redis.error_reply('` + leaseTakenReply + `') end
if qfor ~= '' then
  local quntil = string.format('%d', server_ms() + tonumber(qfor))
  local qkey = p .. ':quarantine:' .. ps
  for i = 5, #ARGV, 2 do
    redis.call('ZADD', qkey, 'GT', quntil, ARGV[i+1])
  end
end
local removed = 0
for i = 5, #ARGV, 2 do
  local target, port = ARGV[i], ARGV[i+1]
  local rkey = p .. ':route:' .. target
  local raw = redis.call('HGET', rkey, ps)
  local match = false
  if raw then
    local ok, e = pcall(cjson.decode, raw)
    match = (not ok) or type(e) ~= 'table' or tostring(e.port) == port
  end
  if match then
    redis.call('HDEL', rkey, ps)
    if redis.call('HLEN', rkey) == 0 then redis.call('SREM', p .. ':targets', target) end
    redis.call('XADD', p .. ':changes', 'MAXLEN', '~', maxlen, '*', 'k', 'route', 'id', target)
    removed = removed + 1
  end
  if redis.call('HGET', p .. ':psroutes:' .. ps, port) == target then
    redis.call('HDEL', p .. ':psroutes:' .. ps, port)
  end
end
return removed
`)

// batchSize bounds how many publications one script call carries, so a
// large registration does not block Redis for long.
const batchSize = 500

// Publish records backends of PS psID. It returns one error per publication,
// in order: nil, or a *ConflictError (wrapping ErrConflict) that names the
// agent that holds the target and says whether it holds it under another
// credential. The second result is an error talking to Redis.
func (r *Registry) Publish(ctx context.Context, psID string, pubs []Publication) ([]error, error) {
	if err := validPSID(psID); err != nil {
		return nil, err
	}
	out := make([]error, len(pubs))
	for start := 0; start < len(pubs); start += batchSize {
		end := min(start+batchSize, len(pubs))
		args := []any{psID, r.maxLen, r.nonceOf(psID)}
		for _, p := range pubs[start:end] {
			if !p.Target.IsValid() || p.Port == 0 || p.AgentID == "" {
				return nil, fmt.Errorf("publish %v: target, port and agent id are required", p)
			}
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)), p.AgentID, p.Owner)
		}
		res, err := publishScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).StringSlice()
		if err != nil {
			return nil, fmt.Errorf("publish routes of ps %s: %w", psID, guardErr(err))
		}
		for i, holder := range res {
			if holder != "" {
				out[start+i] = &ConflictError{Target: pubs[start+i].Target, Holder: holder[1:], OtherCredential: holder[0] == 'O'}
			}
		}
	}
	return out, nil
}

// Release is what a PS does with ports it gives up: it quarantines the
// ports of pubs until until, on the caller's clock (Config.Now; Redis
// stores its own now plus the time left, see quarantineFor; a port already
// quarantined for longer keeps its later time), so the PS does not hand them to another target while
// some reader may still map them to the old one, and then withdraws the
// backends: each pair is removed only if the PS's backend for its target
// still has that port (a publication's AgentID is ignored).
//
// Both happen in one script call per batch of 500, the quarantine first,
// so no failure, halfway or otherwise, leaves a withdrawn port
// unquarantined. A failed call may leave ports quarantined but not yet
// withdrawn, which is safe; calling Release again finishes the job.
func (r *Registry) Release(ctx context.Context, psID string, pubs []Publication, until time.Time) error {
	if err := validPSID(psID); err != nil {
		return err
	}
	return r.withdraw(ctx, psID, pubs, r.quarantineFor(until))
}

// quarantineFor turns a quarantine end on this registry's clock into the
// duration (ms) withdrawScript adds to Redis's clock. Quarantines are
// written by one process and judged by another (a peer's CollectDead
// quarantines the ports of a dead PS that a restart of it reads back), so
// they are kept on Redis's clock like leases.
func (r *Registry) quarantineFor(until time.Time) string {
	return strconv.FormatInt(until.Sub(r.now()).Milliseconds(), 10)
}

// withdraw runs withdrawScript over pubs in batches; quarantineMS is how
// long (ms) the ports stay quarantined, or "" to withdraw without
// quarantine (only tests do: every caller that gives ports up goes through
// Release or WithdrawAll).
func (r *Registry) withdraw(ctx context.Context, psID string, pubs []Publication, quarantineMS string) error {
	for start := 0; start < len(pubs); start += batchSize {
		end := min(start+batchSize, len(pubs))
		args := []any{psID, r.maxLen, quarantineMS, r.nonceOf(psID)}
		for _, p := range pubs[start:end] {
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)))
		}
		if err := withdrawScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).Err(); err != nil {
			return fmt.Errorf("withdraw routes of ps %s: %w", psID, guardErr(err))
		}
	}
	return nil
}

// PortsInUse returns the ports the registry records as used by psID's
// backends (including leftovers of an earlier run of the same PS).
func (r *Registry) PortsInUse(ctx context.Context, psID string) (map[uint16]netip.AddrPort, error) {
	m, err := r.rdb.HGetAll(ctx, r.keys.psroutes(psID)).Result()
	if err != nil {
		return nil, fmt.Errorf("ports in use by ps %s: %w", psID, err)
	}
	out := make(map[uint16]netip.AddrPort, len(m))
	for ps, t := range m {
		port, err1 := strconv.ParseUint(ps, 10, 16)
		target, err2 := netip.ParseAddrPort(t)
		if err1 != nil || err2 != nil {
			r.log.Warn("ignoring malformed port record", "ps_id", psID, "port", textclip.Short(ps), "target", textclip.Short(t))
			continue
		}
		out[uint16(port)] = target
	}
	return out, nil
}

// WithdrawAll removes every backend PS psID has in the registry (a restarted
// PS's leftovers, or a dead PS's, cleaned by a peer), quarantines their ports
// until quarantineUntil (on this registry's clock, as in Release), and
// returns the ports.
func (r *Registry) WithdrawAll(ctx context.Context, psID string, quarantineUntil time.Time) ([]uint16, error) {
	used, err := r.PortsInUse(ctx, psID)
	if err != nil {
		return nil, err
	}
	pubs := make([]Publication, 0, len(used))
	ports := make([]uint16, 0, len(used))
	for port, t := range used {
		pubs = append(pubs, Publication{Target: t, Port: port})
		ports = append(ports, port)
	}
	sort.Slice(ports, func(i, j int) bool { return ports[i] < ports[j] })
	// Release's rule (quarantine before withdraw) without its id check: a
	// peer cleaning up ids read back from Redis must not stop at a junk one.
	if err := r.withdraw(ctx, psID, pubs, r.quarantineFor(quarantineUntil)); err != nil {
		return nil, err
	}
	return ports, nil
}

// quarantinedScript drops the ended quarantines of a PS and returns Redis's
// now (ms) and the rest, as [member, score, ...]. ARGV: ps_id.
var quarantinedScript = redis.NewScript(luaServerMS + `
local key = KEYS[1] .. ':quarantine:' .. ARGV[1]
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
return {now, redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')}
`)

// Quarantined returns psID's ports whose quarantine has not ended, with
// the time it ends on this registry's clock (converted from Redis's, as
// lease expiries are); ended entries are removed on the way.
func (r *Registry) Quarantined(ctx context.Context, psID string) (map[uint16]time.Time, error) {
	sent := r.now()
	res, err := quarantinedScript.Run(ctx, r.rdb, []string{r.keys.p}, psID).Slice()
	if err != nil {
		return nil, fmt.Errorf("read quarantine of ps %s: %w", psID, err)
	}
	srvNow, ok := res[0].(int64)
	if !ok || len(res) != 2 {
		return nil, fmt.Errorf("read quarantine of ps %s: %w: unexpected reply shape", psID, ErrBadData)
	}
	flat, _ := res[1].([]any)
	out := make(map[uint16]time.Time, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		m, _ := flat[i].(string)
		sc, _ := flat[i+1].(string)
		p, err1 := strconv.ParseUint(m, 10, 16)
		ms, err2 := strconv.ParseFloat(sc, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		out[uint16(p)] = localTime(sent, srvNow, int64(ms))
	}
	return out, nil
}

// forgetScript deletes a PS's lease and removes it from the set of PS
// nodes. ARGV: ps_id, maxlen, nonce (see luaLeaseTaken).
var forgetScript = redis.NewScript(luaLeaseTaken + `
local p, ps = KEYS[1], ARGV[1]
if lease_taken(p, ps, ARGV[3]) then return redis.error_reply('` + leaseTakenReply + `') end
redis.call('DEL', p .. ':ps:' .. ps)
redis.call('SREM', p .. ':pses', ps)
redis.call('XADD', p .. ':changes', 'MAXLEN', '~', ARGV[2], '*', 'k', 'ps', 'id', ps)
return 1
`)

// Forget removes a PS's lease and port records after its backends were
// withdrawn (a clean shutdown, or a peer's cleanup of a dead PS). The
// quarantine set stays until it runs out. For an id this Registry claimed,
// it is guarded like RenewPS: a lease another instance took is left alone.
func (r *Registry) Forget(ctx context.Context, psID string) error {
	err := forgetScript.Run(ctx, r.rdb, []string{r.keys.p}, psID, r.maxLen, r.nonceOf(psID)).Err()
	if err != nil {
		return fmt.Errorf("forget ps %s: %w", psID, guardErr(err))
	}
	return nil
}

// CollectDead withdraws the backends of every PS whose lease lapsed more
// than grace ago (judged on Redis's clock, through readLeases), quarantining their ports for quarantine, and forgets those
// PS nodes. Any PS may run it; running it twice is harmless. It returns the
// ids it collected.
func (r *Registry) CollectDead(ctx context.Context, grace, quarantine time.Duration) ([]string, error) {
	ids, err := r.rdb.SMembers(ctx, r.keys.pses()).Result()
	if err != nil {
		return nil, fmt.Errorf("list ps nodes: %w", err)
	}
	leases, err := r.readLeases(ctx, ids)
	if err != nil {
		return nil, err
	}
	now := r.now()
	var dead []string
	for _, id := range ids {
		l, ok := leases[id]
		if ok && now.Sub(l.ExpiresAt) < grace {
			continue
		}
		if _, err := r.WithdrawAll(ctx, id, now.Add(quarantine)); err != nil {
			return dead, err
		}
		if err := r.Forget(ctx, id); err != nil {
			return dead, err
		}
		dead = append(dead, id)
	}
	return dead, nil
}
