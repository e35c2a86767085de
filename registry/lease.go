package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

// luaServerMS defines server_ms(), Redis's clock in unix ms. Every script
// that stamps or judges a lease or a quarantine uses it, so expiry is
// decided on one clock whatever the callers' clocks say. (Writes after TIME
// are fine: Redis replicates scripts by their effects since 5.0.)
const luaServerMS = `
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
`

// luaLeaseTaken defines lease_taken(p, ps, nonce): whether PS ps's lease
// is held under another instance's nonce. Every write on behalf of a
// claimed id (nonce non-empty) checks it in the same script, so an
// instance whose id was taken over cannot touch the new holder's routes,
// quarantine or lease, whatever it still has in flight. An absent lease,
// or one written without a nonce, takes no side.
const luaLeaseTaken = `
local function lease_taken(p, ps, nonce)
  if nonce == '' then return false end
  local cur = redis.call('HGET', p .. ':ps:' .. ps, 'nonce')
  return cur ~= false and cur ~= nonce
end
`

// leaseTakenReply is the error reply of a guarded script that found the
// lease taken (see luaLeaseTaken and guardErr).
const leaseTakenReply = "TETHER_LEASE_TAKEN"

// leaseScript writes a PS's lease stamped with Redis's clock. KEYS[1] is
// the hash tag; ARGV: ps_id, addr, state, ttl_ms, maxlen, nonce, mode,
// generation (a fresh random id, stored only if the registry has none),
// addrs (every advertised address, space-separated, addr first).
//
// With a nonce, mode "claim" refuses a lease that is live under another
// nonce, replying {"H", addr, ms_left, renewed_ms, nonce}; mode "renew"
// refuses a lease that carries another nonce, live or not (another
// instance claimed the id: this one's routes were withdrawn by it),
// replying {"T", addr, ms_left}. Otherwise it writes and replies {"OK",
// existed (1 if the lease key was there before), generation}.
var leaseScript = redis.NewScript(luaServerMS + `
local p, id, maxlen, nonce, mode = KEYS[1], ARGV[1], ARGV[5], ARGV[6], ARGV[7]
local key = p .. ':ps:' .. id
local now = server_ms()
local existed = redis.call('EXISTS', key)
if nonce ~= '' then
  local cur = redis.call('HMGET', key, 'nonce', 'expires_ms', 'addr', 'renewed_ms')
  if cur[1] and cur[1] ~= nonce then
    local left = (tonumber(cur[2] or '0') or 0) - now
    if mode == 'renew' then return {'T', cur[3] or '', left} end
    if left > 0 then return {'H', cur[3] or '', left, cur[4] or '', cur[1]} end
  elseif not cur[1] and mode == 'claim' and redis.call('EXISTS', key) == 1 then
    -- A lease written without a nonce (an older version): held while live.
    local left = (tonumber(cur[2] or '0') or 0) - now
    if left > 0 then return {'H', cur[3] or '', left, cur[4] or '', ''} end
  end
  redis.call('HSET', key, 'nonce', nonce)
end
redis.call('HSET', key, 'addr', ARGV[2], 'addrs', ARGV[9], 'state', ARGV[3],
  'expires_ms', string.format('%d', now + tonumber(ARGV[4])), 'renewed_ms', string.format('%d', now))
redis.call('SADD', p .. ':pses', id)
redis.call('XADD', p .. ':changes', 'MAXLEN', '~', maxlen, '*', 'k', 'ps', 'id', id)
redis.call('SET', p .. ':generation', ARGV[8], 'NX')
return {'OK', existed, redis.call('GET', p .. ':generation')}
`)

// readLeasesScript returns Redis's now (ms) followed by the HGETALL of the
// lease of each id in ARGV, read in the same instant.
var readLeasesScript = redis.NewScript(luaServerMS + `
local out = {server_ms()}
for i = 1, #ARGV do
  out[i + 1] = redis.call('HGETALL', KEYS[1] .. ':ps:' .. ARGV[i])
end
return out
`)

// nonceOf returns the nonce r claimed psID under (ClaimPS), or "" for an
// id it never claimed (its writes are unguarded).
func (r *Registry) nonceOf(psID string) string {
	n, _ := r.claims.Load(psID)
	s, _ := n.(string)
	return s
}

// guardErr turns a guarded script's "lease taken" reply into ErrLeaseTaken.
func guardErr(err error) error {
	if err != nil && strings.Contains(err.Error(), leaseTakenReply) {
		return ErrLeaseTaken
	}
	return err
}

// ClaimPS takes PS id l.ID for the instance l.Nonce names: it writes the
// lease as RenewPS does, unless another instance's lease for the id is
// still live (on Redis's clock), in which case it writes nothing and
// returns a *LeaseHeldError naming that instance's address. A lease that
// lapsed (a crashed predecessor) is taken over. After a claim, every write
// this Registry makes for the id is guarded by the nonce: once another
// instance claims the id, they fail with ErrLeaseTaken and change nothing.
func (r *Registry) ClaimPS(ctx context.Context, l PSLease) error {
	if l.Nonce == "" {
		return fmt.Errorf("claim ps %s: a nonce is required", l.ID)
	}
	res, err := r.writeLease(ctx, l, "claim")
	if err != nil {
		return fmt.Errorf("claim ps %s: %w", l.ID, err)
	}
	switch {
	case len(res) == 5 && res[0] == "H":
		left, _ := res[2].(int64)
		renewed, _ := strconv.ParseInt(fmt.Sprint(res[3]), 10, 64)
		addr, _ := res[1].(string)
		nonce, _ := res[4].(string)
		return &LeaseHeldError{ID: l.ID, Addr: addr, Nonce: nonce, ExpiresIn: time.Duration(left) * time.Millisecond, RenewedMS: renewed}
	case len(res) >= 1 && res[0] == "OK":
		r.claims.Store(l.ID, l.Nonce)
		if gen := okGeneration(res); gen != "" {
			r.generations.Store(l.ID, gen)
		}
		return nil
	}
	return fmt.Errorf("claim ps %s: %w: unexpected reply %v", l.ID, ErrBadData, res)
}

// RenewPS writes the PS's lease (address, state, and an expiry of Redis's
// now plus l.TTL) and announces it on the change feed. Without a TTL,
// l.ExpiresAt minus Config.Now is the TTL: both are the writer's clock, so
// only a duration leaves the host.
//
// The renewal is guarded by l.Nonce, or else by the nonce this Registry
// claimed the id under (see ClaimPS): if another instance claimed the id
// since, nothing is written and the error wraps ErrLeaseTaken.
func (r *Registry) RenewPS(ctx context.Context, l PSLease) error {
	if l.Nonce == "" {
		l.Nonce = r.nonceOf(l.ID)
	}
	res, err := r.writeLease(ctx, l, "renew")
	if err != nil {
		return fmt.Errorf("renew lease of ps %s: %w", l.ID, err)
	}
	if len(res) == 3 && res[0] == "T" {
		return fmt.Errorf("renew lease of ps %s: %w: now held by the instance at %s", l.ID, ErrLeaseTaken, textclip.Short(fmt.Sprint(res[1])))
	}
	if l.Nonce == "" || len(res) != 3 {
		// Unclaimed writers (tools, tests) own no routes to republish.
		return nil
	}
	gen := okGeneration(res)
	prev, _ := r.generations.Swap(l.ID, gen)
	if existed, _ := res[1].(int64); existed == 0 {
		return fmt.Errorf("renew lease of ps %s: %w: the lease key was gone (written again now)", l.ID, ErrRegistryDataLost)
	}
	if p, _ := prev.(string); p != "" && p != gen {
		return fmt.Errorf("renew lease of ps %s: %w: registry generation changed from %s to %s", l.ID, ErrRegistryDataLost, textclip.Short(p), textclip.Short(gen))
	}
	return nil
}

// ErrRegistryDataLost is what RenewPS returns, after writing the lease,
// when the registry lost data since this Registry's previous write for the
// id: the lease key was gone (FLUSHALL, a restart without persistence, a
// failover to a replica without the data) or the registry's generation
// changed. The lease is live again, but the PS's routes may be gone: it
// must republish every one of them at once.
var ErrRegistryDataLost = errors.New("registry lost this ps's data")

// okGeneration returns the generation in an {"OK", existed, generation}
// reply of leaseScript.
func okGeneration(res []any) string {
	if len(res) != 3 {
		return ""
	}
	g, _ := res[2].(string)
	return g
}

// newGeneration returns a fresh random registry generation id.
func newGeneration() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go >= 1.24)
	return hex.EncodeToString(b)
}

// writeLease runs leaseScript in mode and returns its reply.
func (r *Registry) writeLease(ctx context.Context, l PSLease, mode string) ([]any, error) {
	if err := validPSID(l.ID); err != nil {
		return nil, err
	}
	if l.State == "" {
		l.State = PSActive
	}
	ttl := l.TTL
	if ttl == 0 {
		if l.ExpiresAt.IsZero() {
			return nil, errors.New("neither a TTL nor an expiry given")
		}
		ttl = l.ExpiresAt.Sub(r.now())
	}
	addrs, err := leaseAddrs(l)
	if err != nil {
		return nil, err
	}
	return leaseScript.Run(ctx, r.rdb, []string{r.keys.p},
		l.ID, l.Addr.String(), string(l.State), ttl.Milliseconds(), r.maxLen, l.Nonce, mode, newGeneration(), addrs).Slice()
}

// leaseAddrs checks a lease's address set and returns it as stored (the
// addrs field): space-separated, the primary Addr first. A nil Addrs means
// [Addr]; a set that lacks Addr, or holds an invalid or repeated address,
// is refused, since readers would judge every backend against it.
func leaseAddrs(l PSLease) (string, error) {
	if !l.Addr.IsValid() {
		return "", errors.New("the lease has no address")
	}
	if len(l.Addrs) == 0 {
		return l.Addr.String(), nil
	}
	out := []string{l.Addr.String()}
	seen := make(map[netip.Addr]bool, len(l.Addrs))
	for _, a := range l.Addrs {
		if !a.IsValid() {
			return "", fmt.Errorf("advertised addresses %v: an invalid address", l.Addrs)
		}
		if seen[a] {
			return "", fmt.Errorf("advertised addresses %v: %s is given twice", l.Addrs, a)
		}
		seen[a] = true
		if a != l.Addr {
			out = append(out, a.String())
		}
	}
	if !seen[l.Addr] {
		return "", fmt.Errorf("advertised addresses %v do not contain the primary address %s", l.Addrs, l.Addr)
	}
	return strings.Join(out, " "), nil
}

// parseAddrs reads a lease's addrs field: the primary addr first, then
// the others. A lease written by an older version has none: [addr].
func parseAddrs(id string, primary netip.Addr, field string) ([]netip.Addr, error) {
	out := []netip.Addr{primary}
	for f := range strings.FieldsSeq(field) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%w: ps %s addrs %q", ErrBadData, id, textclip.Short(field))
		}
		if a != primary {
			out = append(out, a)
		}
	}
	return out, nil
}

// PSLeases returns every PS lease in the registry, live or not.
func (r *Registry) PSLeases(ctx context.Context) (map[string]PSLease, error) {
	ids, err := r.rdb.SMembers(ctx, r.keys.pses()).Result()
	if err != nil {
		return nil, fmt.Errorf("list ps nodes: %w", err)
	}
	return r.readLeases(ctx, ids)
}

// readLeases reads the leases of ids, with Redis's clock, in one script
// call, and expresses their expiries on this reader's clock (see
// PSLease.ExpiresAt). Ids without a lease are left out; malformed leases
// are logged and left out, so one bad record cannot hide every other PS.
func (r *Registry) readLeases(ctx context.Context, ids []string) (map[string]PSLease, error) {
	out := make(map[string]PSLease, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	args := make([]any, len(ids))
	for i, id := range ids {
		args[i] = id
	}
	// The reader's time at sending: Redis read its clock after it, so the
	// local expiry errs early (by at most the round trip), never late.
	sent := r.now()
	res, err := readLeasesScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).Slice()
	if err != nil {
		return nil, fmt.Errorf("read ps leases: %w", err)
	}
	srvNow, ok := res[0].(int64)
	if !ok || len(res) != len(ids)+1 {
		return nil, fmt.Errorf("read ps leases: %w: unexpected reply shape", ErrBadData)
	}
	for i, id := range ids {
		m := pairs(res[i+1])
		if len(m) == 0 {
			continue
		}
		l, err := parseLease(id, m, sent, srvNow)
		if err != nil {
			r.log.Warn("ignoring malformed ps lease", "ps_id", id, "err", err)
			continue
		}
		out[id] = l
	}
	return out, nil
}

// pairs turns a flat [field, value, ...] script reply into a map.
func pairs(v any) map[string]string {
	flat, _ := v.([]any)
	m := make(map[string]string, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		k, _ := flat[i].(string)
		val, _ := flat[i+1].(string)
		m[k] = val
	}
	return m
}

// localTime converts a time in unix ms on Redis's clock into the reader's
// clock, given that Redis's clock read srvNow when the reader's read sent.
func localTime(sent time.Time, srvNow, ms int64) time.Time {
	return sent.Add(time.Duration(ms-srvNow) * time.Millisecond)
}

// parseLease decodes a lease hash; its expiry, on Redis's clock, is
// converted to the reader's (see localTime).
func parseLease(id string, m map[string]string, sent time.Time, srvNow int64) (PSLease, error) {
	addr, err := netip.ParseAddr(m["addr"])
	if err != nil {
		return PSLease{}, fmt.Errorf("%w: ps %s addr %q", ErrBadData, id, textclip.Short(m["addr"]))
	}
	ms, err := strconv.ParseInt(m["expires_ms"], 10, 64)
	if err != nil {
		return PSLease{}, fmt.Errorf("%w: ps %s expires_ms %q", ErrBadData, id, textclip.Short(m["expires_ms"]))
	}
	st := PSState(m["state"])
	if st != PSActive && st != PSDraining {
		return PSLease{}, fmt.Errorf("%w: ps %s state %q", ErrBadData, id, textclip.Short(m["state"]))
	}
	addrs, err := parseAddrs(id, addr, m["addrs"])
	if err != nil {
		return PSLease{}, err
	}
	return PSLease{ID: id, Addr: addr, Addrs: addrs, State: st, Nonce: m["nonce"], ExpiresAt: localTime(sent, srvNow, ms)}, nil
}
