package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

// luaPortKey defines port_key(addr, port): the psroutes field and
// quarantine member of a PS port, ip:port as netip.AddrPort.String writes
// it ([v6]:port for IPv6), or the bare port (the format of older versions)
// when the address is unknown (false or ""). See doc.go for how the bare
// form is read.
const luaPortKey = `
local function port_key(addr, port)
  if not addr or addr == '' then return port end
  if string.find(addr, ':', 1, true) then return '[' .. addr .. ']:' .. port end
  return addr .. ':' .. port
end
`

// luaEntryAddr defines entry_addr(e): a decoded route entry's address, or
// nil for an entry written without one.
const luaEntryAddr = `
local function entry_addr(e)
  if type(e.addr) == 'string' and e.addr ~= '' then return e.addr end
  return nil
end
`

// publishScript publishes backends of one PS. ARGV: ps_id, maxlen, nonce
// (see luaLeaseTaken: "" for none), then quintuples (target, port,
// agent_id, owner, addr). Each entry records the PS address its port was
// assigned on: the quintuple's addr, or, when that is "", the primary
// address in the PS's lease (so an entry says which instance's address it
// was published with), and the PS's port index (psroutes) records the
// (address, port) pair. It returns, per quintuple, ""
// on success, or the live holder that refuses it: "A" then its agent id
// for another agent, "O" then its agent id for the same agent id under
// another credential (both owners non-empty and different; an entry of an
// older version has no owner and never refuses on that ground). Owners are
// compared only with other PS nodes' entries: on its own PS, a newer
// session of the agent was already admitted by the PS. Liveness is judged
// on Redis's clock.
var publishScript = redis.NewScript(luaServerMS + luaLeaseTaken + luaPortKey + luaEntryAddr + `
local p, ps, maxlen = KEYS[1], ARGV[1], ARGV[2]
if lease_taken(p, ps, ARGV[3]) then return redis.error_reply('` + leaseTakenReply + `') end
local now = server_ms()
local lease_addr = redis.call('HGET', p .. ':ps:' .. ps, 'addr')
local idx, tkey, skey = p .. ':psroutes:' .. ps, p .. ':targets', p .. ':changes'
-- Lease expiries of other PS nodes, read once per call: a batch names the
-- same few holders again and again.
local expiry = {}
local res = {}
-- Pass 1 judges every publication and writes nothing, so a failure here
-- (a route key of the wrong type) leaves the registry as it was. A batch
-- names each target once (Publish cuts batches at a repeated target), so
-- no judgement depends on a write of the same call.
local take, unindex = {}, {}
for i = 4, #ARGV, 5 do
  local target, port, agent, owner, addr = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  if addr == '' then addr = lease_addr end
  local rkey = p .. ':route:' .. target
  local holder = ''
  local mine = nil
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
        local exp = expiry[other]
        if exp == nil then
          exp = tonumber(redis.call('HGET', p .. ':ps:' .. other, 'expires_ms') or '0') or 0
          expiry[other] = exp
        end
        if exp > now then holder = why .. tostring(e.agent_id) end
      end
      if other == ps then mine = e end
    end
  end
  res[#res + 1] = holder
  if holder == '' then
    local key = port_key(addr, port)
    if mine then
      -- Only a publication that takes the target over unindexes the
      -- (address, port) it replaces, in either format: a refused one
      -- leaves the holder's entry and its index alone, so WithdrawAll and
      -- resync still find (and quarantine) it.
      local mport = tostring(mine.port)
      for _, old in ipairs({port_key(entry_addr(mine) or lease_addr, mport), mport}) do
        if old ~= key then
          unindex[#unindex + 1] = old
          unindex[#unindex + 1] = target
        end
      end
    end
    local e = {port = tonumber(port), agent_id = agent}
    if owner ~= '' then e.owner = owner end
    if addr then e.addr = addr end
    take[#take + 1] = {target = target, rkey = rkey, raw = cjson.encode(e), key = key}
  end
end
if #take == 0 then return res end
-- Pass 2 writes the port index and the set of targets, one command each
-- (a command per entry was a third of the script's time), before any
-- entry: a failure past this point leaves indexed ports without an entry,
-- which WithdrawAll withdraws and quarantines harmlessly, never an entry
-- that WithdrawAll cannot find. Replaced records go first, so one that
-- another target of the batch takes over is not removed after it.
for j = 1, #unindex, 2 do
  if redis.call('HGET', idx, unindex[j]) == unindex[j+1] then redis.call('HDEL', idx, unindex[j]) end
end
local fields, targets = {}, {}
for j, t in ipairs(take) do
  fields[2*j - 1], fields[2*j] = t.key, t.target
  targets[j] = t.target
end
redis.call('HSET', idx, unpack(fields))
redis.call('SADD', tkey, unpack(targets))
-- Pass 3: the entries, each with its change entry (readers re-read the key
-- an entry names, see doc.go). The feed is trimmed once per call, not per
-- entry: a MAXLEN on every XADD cost as much again, and the bound is
-- approximate anyway.
for _, t in ipairs(take) do
  redis.call('HSET', t.rkey, ps, t.raw)
  redis.call('XADD', skey, '*', 'k', 'route', 'id', t.target)
end
redis.call('XTRIM', skey, 'MAXLEN', '~', maxlen)
return res
`)

// withdrawScript removes backends of one PS, first quarantining their ports
// when asked. ARGV: ps_id, maxlen, quarantine_ms ("" for none: how long,
// counted on Redis's clock, the ports stay quarantined), nonce (see
// luaLeaseTaken), then triples (target, addr, port).
//
// An addr of "" (a caller that knows one address only, or a bare-port
// record of an older version) is resolved to the address of the PS's entry
// for the target when that entry has the port, else to the lease's primary
// address; when neither is known, the pair matches on the port alone and
// its quarantine is written in the bare format (read as every address of
// the lease, see doc.go).
//
// The quarantine of every pair in the call is written before any backend
// is removed: Redis does not roll a script back when it fails halfway, so
// this order is what guarantees that no port is ever withdrawn without its
// quarantine. A pair is removed only if the PS's backend for the target
// still has that port and that address (an entry without an address
// matches on the port), so a late withdraw never removes a newer
// publication (its port is quarantined all the same: the PS gave it up).
// The pair's port index records (either format) that map to the target are
// removed unless they still index the entry that stays. It returns the
// number of backends removed.
var withdrawScript = redis.NewScript(luaServerMS + luaLeaseTaken + luaPortKey + luaEntryAddr + `
local p, ps, maxlen, qfor = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if lease_taken(p, ps, ARGV[4]) then return redis.error_reply('` + leaseTakenReply + `') end
local lease_addr = redis.call('HGET', p .. ':ps:' .. ps, 'addr')
local idx = p .. ':psroutes:' .. ps
-- entry_of reads the PS's entry for target: the decoded entry (nil if
-- malformed) and whether there is one. Where tolerant (resolving addresses,
-- before the quarantine is written), a key of the wrong type reads as no
-- entry, so that nothing keeps the quarantine from being written first.
local function entry_of(target, tolerant)
  local call = redis.call
  if tolerant then call = redis.pcall end
  local raw = call('HGET', p .. ':route:' .. target, ps)
  if type(raw) ~= 'string' then return nil, false end
  local ok, e = pcall(cjson.decode, raw)
  if not ok or type(e) ~= 'table' then return nil, true end
  return e, true
end
local addrs = {}
for i = 5, #ARGV, 3 do
  local target, addr, port = ARGV[i], ARGV[i+1], ARGV[i+2]
  if addr == '' then
    local e = entry_of(target, true)
    if e and tostring(e.port) == port and entry_addr(e) then addr = entry_addr(e) else addr = lease_addr end
  end
  addrs[i] = addr
end
if qfor ~= '' then
  local quntil = string.format('%d', server_ms() + tonumber(qfor))
  local qkey = p .. ':quarantine:' .. ps
  for i = 5, #ARGV, 3 do
    redis.call('ZADD', qkey, 'GT', quntil, port_key(addrs[i], ARGV[i+2]))
  end
end
local removed = 0
for i = 5, #ARGV, 3 do
  local target, addr, port = ARGV[i], addrs[i], ARGV[i+2]
  local rkey = p .. ':route:' .. target
  local e, present = entry_of(target)
  local match = false
  if present then
    -- A malformed entry is removed: nothing could read it anyway.
    match = (not e) or (tostring(e.port) == port and (not addr or not entry_addr(e) or entry_addr(e) == addr))
  end
  if match then
    redis.call('HDEL', rkey, ps)
    if redis.call('HLEN', rkey) == 0 then redis.call('SREM', p .. ':targets', target) end
    redis.call('XADD', p .. ':changes', '*', 'k', 'route', 'id', target)
    removed = removed + 1
    e = nil
  end
  local stays = e and tostring(e.port) == port
  if redis.call('HGET', idx, port) == target and not stays then redis.call('HDEL', idx, port) end
  if addr then
    local key = port_key(addr, port)
    if redis.call('HGET', idx, key) == target and not (stays and (not entry_addr(e) or entry_addr(e) == addr)) then
      redis.call('HDEL', idx, key)
    end
  end
end
redis.call('XTRIM', p .. ':changes', 'MAXLEN', '~', maxlen)
return removed
`)

// batchSize bounds how many publications one script call carries. Redis
// runs one script at a time, so a batch is how long every other client,
// such as a small agent's registration on another PS, may wait behind a
// huge one: 200 publications take about 2 ms of Redis's time, and cost no
// throughput over 500 (TestPublishAtScale), whose 5 ms or more doubled the
// small registration's wait.
const batchSize = 200

// Publish records backends of PS psID. It returns one error per publication,
// in order: nil, or a *ConflictError (wrapping ErrConflict) that names the
// agent that holds the target and says whether it holds it under another
// credential. The second result is an error talking to Redis.
func (r *Registry) Publish(ctx context.Context, psID string, pubs []Publication) ([]error, error) {
	if err := validPSID(psID); err != nil {
		return nil, err
	}
	out := make([]error, len(pubs))
	for start := 0; start < len(pubs); {
		end := publishBatchEnd(pubs, start)
		args := make([]any, 0, 3+5*(end-start))
		args = append(args, psID, r.maxLen, r.nonceOf(psID))
		for _, p := range pubs[start:end] {
			if !p.Target.IsValid() || p.Port == 0 || p.AgentID == "" {
				return nil, fmt.Errorf("publish %v: target, port and agent id are required", p)
			}
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)), p.AgentID, p.Owner, addrArg(p.Addr))
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
		start = end
	}
	return out, nil
}

// publishBatchEnd returns where the batch of pubs that begins at start
// ends: after batchSize publications, or before the first target the batch
// already names. publishScript judges a whole batch before it writes, so a
// target named twice must be judged again after the first one is written,
// in the next batch, as it would have been had it come in a later call.
func publishBatchEnd(pubs []Publication, start int) int {
	end := min(start+batchSize, len(pubs))
	seen := make(map[netip.AddrPort]struct{}, end-start)
	for i := start; i < end; i++ {
		if _, dup := seen[pubs[i].Target]; dup {
			return i
		}
		seen[pubs[i].Target] = struct{}{}
	}
	return end
}

// addrArg is how a script argument carries a publication's PS address:
// "" for the zero Addr (the lease's primary address).
func addrArg(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// Release is what a PS does with ports it gives up: it quarantines the
// (address, port) pairs of pubs until until, on the caller's clock
// (Config.Now; Redis stores its own now plus the time left, see
// quarantineFor; a pair already quarantined for longer keeps its later
// time), so the PS does not hand them to another target while some reader
// may still map them to the old one, and then withdraws the backends: each
// pair is removed only if the PS's backend for its target still has that
// port and that address (an entry without an address matches on the port;
// a publication's zero Addr means the lease's primary address, see
// withdrawScript). A publication's AgentID is ignored.
//
// Both happen in one script call per batch, the quarantine first, so no
// failure, halfway or otherwise, leaves a withdrawn port unquarantined. A
// failed call may leave ports quarantined but not yet withdrawn, which is
// safe; calling Release again finishes the job.
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
		args := make([]any, 0, 4+3*(end-start))
		args = append(args, psID, r.maxLen, quarantineMS, r.nonceOf(psID))
		for _, p := range pubs[start:end] {
			args = append(args, p.Target.String(), addrArg(p.Addr), strconv.Itoa(int(p.Port)))
		}
		if err := withdrawScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).Err(); err != nil {
			return fmt.Errorf("withdraw routes of ps %s: %w", psID, guardErr(err))
		}
	}
	return nil
}

// portRecord is one field of a PS's port index (psroutes): the PS address
// and port, and the target it serves.
type portRecord struct {
	// Addr is the PS address; for a bare-port record of an older version
	// it is resolved (see portRecords), and invalid when nothing tells.
	Addr   netip.Addr
	Port   uint16
	Target netip.AddrPort
}

// portRecords reads PS psID's port index. A field is ip:port; a bare port
// (written by an older version, which had one address) is read as the
// address of the PS's route entry for the target when that entry has the
// port and an address, else as the lease's primary address, else (no
// lease) with an invalid address. Malformed fields are logged and skipped.
func (r *Registry) portRecords(ctx context.Context, psID string) ([]portRecord, error) {
	m, err := r.rdb.HGetAll(ctx, r.keys.psroutes(psID)).Result()
	if err != nil {
		return nil, fmt.Errorf("ports in use by ps %s: %w", psID, err)
	}
	out := make([]portRecord, 0, len(m))
	var bare []int // indexes in out of bare-port records
	for field, t := range m {
		target, err := netip.ParseAddrPort(t)
		if err != nil {
			r.log.Warn("ignoring malformed port record", "ps_id", psID, "port", textclip.Short(field), "target", textclip.Short(t))
			continue
		}
		if a, err := netip.ParseAddrPort(field); err == nil {
			out = append(out, portRecord{Addr: a.Addr(), Port: a.Port(), Target: target})
			continue
		}
		port, err := strconv.ParseUint(field, 10, 16)
		if err != nil || port == 0 {
			r.log.Warn("ignoring malformed port record", "ps_id", psID, "port", textclip.Short(field), "target", textclip.Short(t))
			continue
		}
		bare = append(bare, len(out))
		out = append(out, portRecord{Port: uint16(port), Target: target})
	}
	if len(bare) == 0 {
		return out, nil
	}
	leases, err := r.readLeases(ctx, []string{psID})
	if err != nil {
		return nil, err
	}
	primary := leases[psID].Addr
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.StringCmd, len(bare))
	for i, j := range bare {
		cmds[i] = pipe.HGet(ctx, r.keys.route(out[j].Target), psID)
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("ports in use by ps %s: read route entries: %w", psID, err)
	}
	for i, j := range bare {
		out[j].Addr = primary
		if e, err := decodeEntry(cmds[i].Val()); err == nil && e.Port == out[j].Port && e.Addr != "" {
			if a, err := netip.ParseAddr(e.Addr); err == nil {
				out[j].Addr = a
			}
		}
	}
	return out, nil
}

// PortsInUse returns the (address, port) pairs the registry records as
// used by psID's backends (including leftovers of an earlier run of the
// same PS), with the target each serves. Records of an older version,
// which name a bare port, are read as portRecords says; one that cannot
// be placed on an address (the PS has no lease) is logged and left out.
func (r *Registry) PortsInUse(ctx context.Context, psID string) (map[netip.AddrPort]netip.AddrPort, error) {
	recs, err := r.portRecords(ctx, psID)
	if err != nil {
		return nil, err
	}
	out := make(map[netip.AddrPort]netip.AddrPort, len(recs))
	for _, rec := range recs {
		if !rec.Addr.IsValid() {
			r.log.Warn("ignoring a bare port record of a ps without a lease", "ps_id", psID, "port", rec.Port, "target", rec.Target.String())
			continue
		}
		out[netip.AddrPortFrom(rec.Addr, rec.Port)] = rec.Target
	}
	return out, nil
}

// WithdrawAll removes every backend PS psID has in the registry (a restarted
// PS's leftovers, or a dead PS's, cleaned by a peer), quarantines their
// (address, port) pairs until quarantineUntil (on this registry's clock, as
// in Release), and returns the pairs, sorted. Records of both formats are
// withdrawn; a bare-port record that cannot be placed on an address is
// withdrawn and quarantined as a bare port, and left out of the result.
func (r *Registry) WithdrawAll(ctx context.Context, psID string, quarantineUntil time.Time) ([]netip.AddrPort, error) {
	recs, err := r.portRecords(ctx, psID)
	if err != nil {
		return nil, err
	}
	pubs := make([]Publication, 0, len(recs))
	ports := make([]netip.AddrPort, 0, len(recs))
	for _, rec := range recs {
		pubs = append(pubs, Publication{Target: rec.Target, Addr: rec.Addr, Port: rec.Port})
		if rec.Addr.IsValid() {
			ports = append(ports, netip.AddrPortFrom(rec.Addr, rec.Port))
		}
	}
	slices.SortFunc(ports, netip.AddrPort.Compare)
	// Release's rule (quarantine before withdraw) without its id check: a
	// peer cleaning up ids read back from Redis must not stop at a junk one.
	if err := r.withdraw(ctx, psID, pubs, r.quarantineFor(quarantineUntil)); err != nil {
		return nil, err
	}
	return ports, nil
}

// quarantinedScript drops the ended quarantines of a PS and returns Redis's
// now (ms), the lease's addr and addrs fields (to place bare-port members
// of an older version), and the rest, as [member, score, ...]. ARGV: ps_id.
var quarantinedScript = redis.NewScript(luaServerMS + `
local key = KEYS[1] .. ':quarantine:' .. ARGV[1]
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local l = redis.call('HMGET', KEYS[1] .. ':ps:' .. ARGV[1], 'addr', 'addrs')
return {now, l[1] or '', l[2] or '', redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')}
`)

// Quarantined returns psID's (address, port) pairs whose quarantine has
// not ended, with the time it ends on this registry's clock (converted
// from Redis's, as lease expiries are); ended entries are removed on the
// way. A bare-port member (written by an older version, or for a pair
// whose address was unknown) quarantines that port on every address of
// the PS's lease: too much quarantine is safe, too little never is. Bare
// members of a PS without a lease are logged and left out (the PS reads
// its quarantine after it claimed its lease).
func (r *Registry) Quarantined(ctx context.Context, psID string) (map[netip.AddrPort]time.Time, error) {
	sent := r.now()
	res, err := quarantinedScript.Run(ctx, r.rdb, []string{r.keys.p}, psID).Slice()
	if err != nil {
		return nil, fmt.Errorf("read quarantine of ps %s: %w", psID, err)
	}
	srvNow, ok := res[0].(int64)
	if !ok || len(res) != 4 {
		return nil, fmt.Errorf("read quarantine of ps %s: %w: unexpected reply shape", psID, ErrBadData)
	}
	var leaseAddrs []netip.Addr
	if a, err := netip.ParseAddr(fmt.Sprint(res[1])); err == nil {
		if leaseAddrs, err = parseAddrs(psID, a, fmt.Sprint(res[2])); err != nil {
			r.log.Warn("bare-port quarantine placed on the primary address only", "ps_id", psID, "err", err)
			leaseAddrs = []netip.Addr{a}
		}
	}
	flat, _ := res[3].([]any)
	out := make(map[netip.AddrPort]time.Time, len(flat)/2)
	put := func(k netip.AddrPort, t time.Time) {
		if old, ok := out[k]; !ok || t.After(old) {
			out[k] = t
		}
	}
	for i := 0; i+1 < len(flat); i += 2 {
		m, _ := flat[i].(string)
		sc, _ := flat[i+1].(string)
		ms, err := strconv.ParseFloat(sc, 64)
		if err != nil {
			continue
		}
		until := localTime(sent, srvNow, int64(ms))
		if k, err := netip.ParseAddrPort(m); err == nil {
			put(k, until)
			continue
		}
		p, err := strconv.ParseUint(m, 10, 16)
		if err != nil {
			r.log.Warn("ignoring malformed quarantine member", "ps_id", psID, "member", textclip.Short(m))
			continue
		}
		if len(leaseAddrs) == 0 {
			r.log.Warn("ignoring a bare-port quarantine of a ps without a lease", "ps_id", psID, "port", p)
		}
		for _, a := range leaseAddrs {
			put(netip.AddrPortFrom(a, uint16(p)), until)
		}
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

// PortCount is how many (address, port) pairs the registry records as used
// by psID's backends: the size of its port index, cheap to poll where
// PortsInUse would read every record.
func (r *Registry) PortCount(ctx context.Context, psID string) (int64, error) {
	n, err := r.rdb.HLen(ctx, r.keys.psroutes(psID)).Result()
	if err != nil {
		return 0, fmt.Errorf("port count of ps %s: %w", psID, err)
	}
	return n, nil
}
