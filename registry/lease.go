package registry

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
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

// renewScript writes a PS's lease stamped with Redis's clock. KEYS[1] is
// the hash tag; ARGV: ps_id, addr, state, ttl_ms, maxlen.
var renewScript = redis.NewScript(luaServerMS + `
local p, id, maxlen = KEYS[1], ARGV[1], ARGV[5]
local now = server_ms()
redis.call('HSET', p .. ':ps:' .. id, 'addr', ARGV[2], 'state', ARGV[3],
  'expires_ms', string.format('%d', now + tonumber(ARGV[4])), 'renewed_ms', string.format('%d', now))
redis.call('SADD', p .. ':pses', id)
redis.call('XADD', p .. ':changes', 'MAXLEN', '~', maxlen, '*', 'k', 'ps', 'id', id)
return now
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

// RenewPS writes the PS's lease (address, state, and an expiry of Redis's
// now plus l.TTL) and announces it on the change feed. Without a TTL,
// l.ExpiresAt minus Config.Now is the TTL: both are the writer's clock, so
// only a duration leaves the host.
func (r *Registry) RenewPS(ctx context.Context, l PSLease) error {
	if err := validPSID(l.ID); err != nil {
		return err
	}
	if l.State == "" {
		l.State = PSActive
	}
	ttl := l.TTL
	if ttl == 0 {
		if l.ExpiresAt.IsZero() {
			return fmt.Errorf("renew lease of ps %s: neither a TTL nor an expiry given", l.ID)
		}
		ttl = l.ExpiresAt.Sub(r.now())
	}
	err := renewScript.Run(ctx, r.rdb, []string{r.keys.p},
		l.ID, l.Addr.String(), string(l.State), ttl.Milliseconds(), r.maxLen).Err()
	if err != nil {
		return fmt.Errorf("renew lease of ps %s: %w", l.ID, err)
	}
	return nil
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
	return PSLease{ID: id, Addr: addr, State: st, ExpiresAt: localTime(sent, srvNow, ms)}, nil
}
