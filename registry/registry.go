package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Config configures a Registry.
type Config struct {
	// URL is a redis:// or rediss:// URL of a single server. For Sentinel or
	// Cluster, use Addrs (and MasterName for Sentinel) instead.
	URL string
	// Addrs, when set, selects go-redis's universal client: several addresses
	// mean a Cluster, or a Sentinel set when MasterName is set.
	Addrs      []string
	MasterName string
	Password   string

	// Prefix is the hash tag every key shares; default "tether".
	Prefix string
	// StreamMaxLen bounds the change stream (approximately); default 100000.
	StreamMaxLen int64
	// Logger receives warnings about malformed data; default slog.Default().
	Logger *slog.Logger
	// Now is the clock; default time.Now. Tests may replace it.
	Now func() time.Time
}

// Registry is the Redis-backed route registry. It is safe for concurrent use.
type Registry struct {
	rdb    redis.UniversalClient
	keys   keys
	maxLen int64
	log    *slog.Logger
	now    func() time.Time
}

// New connects to Redis as cfg says. It does not wait for Redis to be
// reachable: a registry outlives Redis restarts, and every call reports its
// own error.
func New(cfg Config) (*Registry, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "tether"
	}
	if strings.ContainsAny(cfg.Prefix, "{}: ") {
		return nil, fmt.Errorf("registry prefix %q: must not contain braces, colons or blanks", cfg.Prefix)
	}
	if cfg.StreamMaxLen <= 0 {
		cfg.StreamMaxLen = 100000
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	quietRedis()
	var rdb redis.UniversalClient
	switch {
	case cfg.URL != "" && len(cfg.Addrs) > 0:
		return nil, errors.New("registry: set either a Redis URL or addresses, not both")
	case cfg.URL != "":
		opt, err := redis.ParseURL(cfg.URL)
		if err != nil {
			return nil, fmt.Errorf("redis url %q: %w", cfg.URL, err)
		}
		if cfg.Password != "" {
			opt.Password = cfg.Password
		}
		opt.DialTimeout = 2 * time.Second
		opt.ReadTimeout = 3 * time.Second
		opt.WriteTimeout = 3 * time.Second
		opt.MaxRetries = 1
		rdb = redis.NewClient(opt)
	case len(cfg.Addrs) > 0:
		rdb = redis.NewUniversalClient(&redis.UniversalOptions{
			Addrs: cfg.Addrs, MasterName: cfg.MasterName, Password: cfg.Password,
			DialTimeout: 2 * time.Second, ReadTimeout: 3 * time.Second, WriteTimeout: 3 * time.Second,
			MaxRetries: 1,
		})
	default:
		return nil, errors.New("registry: no Redis URL or addresses given")
	}
	return &Registry{rdb: rdb, keys: keys{p: "{" + cfg.Prefix + "}"}, maxLen: cfg.StreamMaxLen, log: cfg.Logger, now: cfg.Now}, nil
}

// Close closes the Redis connections.
func (r *Registry) Close() error { return r.rdb.Close() }

// Ping checks that Redis answers.
func (r *Registry) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("ping redis: %w", err)
	}
	return nil
}

type keys struct{ p string }

func (k keys) ps(id string) string           { return k.p + ":ps:" + id }
func (k keys) pses() string                  { return k.p + ":pses" }
func (k keys) route(t netip.AddrPort) string { return k.p + ":route:" + t.String() }
func (k keys) routeRaw(t string) string      { return k.p + ":route:" + t }
func (k keys) targets() string               { return k.p + ":targets" }
func (k keys) psroutes(id string) string     { return k.p + ":psroutes:" + id }
func (k keys) quarantine(id string) string   { return k.p + ":quarantine:" + id }
func (k keys) changes() string               { return k.p + ":changes" }

// ---- PS side ---------------------------------------------------------------

// RenewPS writes the PS's lease (address, state, expiry) and announces it on
// the change feed.
func (r *Registry) RenewPS(ctx context.Context, l PSLease) error {
	if err := validPSID(l.ID); err != nil {
		return err
	}
	if l.State == "" {
		l.State = PSActive
	}
	now := r.now()
	pipe := r.rdb.TxPipeline()
	pipe.HSet(ctx, r.keys.ps(l.ID),
		"addr", l.Addr.String(),
		"expires_ms", strconv.FormatInt(l.ExpiresAt.UnixMilli(), 10),
		"state", string(l.State),
		"renewed_ms", strconv.FormatInt(now.UnixMilli(), 10))
	pipe.SAdd(ctx, r.keys.pses(), l.ID)
	r.addChange(ctx, pipe, "ps", l.ID)
	if _, err := pipe.Exec(ctx); err != nil {
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

func (r *Registry) readLeases(ctx context.Context, ids []string) (map[string]PSLease, error) {
	out := make(map[string]PSLease, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, len(ids))
	for i, id := range ids {
		cmds[i] = pipe.HGetAll(ctx, r.keys.ps(id))
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read ps leases: %w", err)
	}
	for i, id := range ids {
		m := cmds[i].Val()
		if len(m) == 0 {
			continue
		}
		l, err := parseLease(id, m)
		if err != nil {
			r.log.Warn("ignoring malformed ps lease", "ps_id", id, "err", err)
			continue
		}
		out[id] = l
	}
	return out, nil
}

func parseLease(id string, m map[string]string) (PSLease, error) {
	addr, err := netip.ParseAddr(m["addr"])
	if err != nil {
		return PSLease{}, fmt.Errorf("%w: ps %s addr %q", ErrBadData, id, truncate(m["addr"]))
	}
	ms, err := strconv.ParseInt(m["expires_ms"], 10, 64)
	if err != nil {
		return PSLease{}, fmt.Errorf("%w: ps %s expires_ms %q", ErrBadData, id, truncate(m["expires_ms"]))
	}
	st := PSState(m["state"])
	if st != PSActive && st != PSDraining {
		return PSLease{}, fmt.Errorf("%w: ps %s state %q", ErrBadData, id, truncate(m["state"]))
	}
	return PSLease{ID: id, Addr: addr, State: st, ExpiresAt: time.UnixMilli(ms)}, nil
}

// publishScript publishes backends of one PS. ARGV: ps_id, now_ms, maxlen,
// then triples (target, port, agent_id). It returns, per triple, "" on
// success or the id of the live agent that holds the target.
var publishScript = redis.NewScript(`
local p, ps, now, maxlen = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local res = {}
local n = 0
for i = 4, #ARGV, 3 do
  local target, port, agent = ARGV[i], ARGV[i+1], ARGV[i+2]
  local rkey = p .. ':route:' .. target
  local holder = ''
  local cur = redis.call('HGETALL', rkey)
  for j = 1, #cur, 2 do
    local other, raw = cur[j], cur[j+1]
    local ok, e = pcall(cjson.decode, raw)
    if ok and type(e) == 'table' and e.agent_id ~= agent then
      local exp = tonumber(redis.call('HGET', p .. ':ps:' .. other, 'expires_ms') or '0') or 0
      if exp > now then holder = tostring(e.agent_id) end
    end
    if other == ps and ok and type(e) == 'table' and tostring(e.port) ~= port then
      redis.call('HDEL', p .. ':psroutes:' .. ps, tostring(e.port))
    end
  end
  if holder == '' then
    redis.call('HSET', rkey, ps, cjson.encode({port = tonumber(port), agent_id = agent}))
    redis.call('SADD', p .. ':targets', target)
    redis.call('HSET', p .. ':psroutes:' .. ps, port, target)
    redis.call('XADD', p .. ':changes', 'MAXLEN', '~', maxlen, '*', 'k', 'route', 'id', target)
  end
  n = n + 1
  res[n] = holder
end
return res
`)

// withdrawScript removes backends of one PS. ARGV: ps_id, maxlen, then pairs
// (target, port); a pair is removed only if the PS's backend for the target
// still has that port, so a late withdraw never removes a newer publication.
// It returns the number of backends removed.
var withdrawScript = redis.NewScript(`
local p, ps, maxlen = KEYS[1], ARGV[1], ARGV[2]
local removed = 0
for i = 3, #ARGV, 2 do
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
// in order: nil, or an error wrapping ErrConflict that names the agent that
// holds the target. The second result is an error talking to Redis.
func (r *Registry) Publish(ctx context.Context, psID string, pubs []Publication) ([]error, error) {
	if err := validPSID(psID); err != nil {
		return nil, err
	}
	out := make([]error, len(pubs))
	for start := 0; start < len(pubs); start += batchSize {
		end := min(start+batchSize, len(pubs))
		args := []any{psID, r.now().UnixMilli(), r.maxLen}
		for _, p := range pubs[start:end] {
			if !p.Target.IsValid() || p.Port == 0 || p.AgentID == "" {
				return nil, fmt.Errorf("publish %v: target, port and agent id are required", p)
			}
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)), p.AgentID)
		}
		res, err := publishScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).StringSlice()
		if err != nil {
			return nil, fmt.Errorf("publish routes of ps %s: %w", psID, err)
		}
		for i, holder := range res {
			if holder != "" {
				out[start+i] = fmt.Errorf("%w: %s is held by agent %q", ErrConflict, pubs[start+i].Target, holder)
			}
		}
	}
	return out, nil
}

// Withdraw removes backends of PS psID; each publication's AgentID is
// ignored, its Target and Port must match what is recorded.
func (r *Registry) Withdraw(ctx context.Context, psID string, pubs []Publication) error {
	if err := validPSID(psID); err != nil {
		return err
	}
	for start := 0; start < len(pubs); start += batchSize {
		end := min(start+batchSize, len(pubs))
		args := []any{psID, r.maxLen}
		for _, p := range pubs[start:end] {
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)))
		}
		if err := withdrawScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).Err(); err != nil {
			return fmt.Errorf("withdraw routes of ps %s: %w", psID, err)
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
			r.log.Warn("ignoring malformed port record", "ps_id", psID, "port", truncate(ps), "target", truncate(t))
			continue
		}
		out[uint16(port)] = target
	}
	return out, nil
}

// WithdrawAll removes every backend PS psID has in the registry (a restarted
// PS's leftovers, or a dead PS's, cleaned by a peer), quarantines their ports
// until quarantineUntil, and returns the ports.
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
	// Quarantine first: if the withdraw fails halfway, the ports are still
	// protected from reuse.
	if err := r.Quarantine(ctx, psID, ports, quarantineUntil); err != nil {
		return nil, err
	}
	if err := r.Withdraw(ctx, psID, pubs); err != nil {
		return nil, err
	}
	return ports, nil
}

// Quarantine records that ports of psID must not be reused before until.
// A port already quarantined for longer keeps its later time.
func (r *Registry) Quarantine(ctx context.Context, psID string, ports []uint16, until time.Time) error {
	if len(ports) == 0 {
		return nil
	}
	zs := make([]redis.Z, len(ports))
	for i, p := range ports {
		zs[i] = redis.Z{Score: float64(until.UnixMilli()), Member: strconv.Itoa(int(p))}
	}
	if err := r.rdb.ZAddArgs(ctx, r.keys.quarantine(psID), redis.ZAddArgs{GT: true, Members: zs}).Err(); err != nil {
		return fmt.Errorf("quarantine ports of ps %s: %w", psID, err)
	}
	return nil
}

// Quarantined returns psID's ports whose quarantine has not ended at now,
// with the time it ends; ended entries are removed on the way.
func (r *Registry) Quarantined(ctx context.Context, psID string) (map[uint16]time.Time, error) {
	key := r.keys.quarantine(psID)
	now := r.now().UnixMilli()
	if err := r.rdb.ZRemRangeByScore(ctx, key, "-inf", strconv.FormatInt(now, 10)).Err(); err != nil {
		return nil, fmt.Errorf("expire quarantine of ps %s: %w", psID, err)
	}
	zs, err := r.rdb.ZRangeWithScores(ctx, key, 0, -1).Result()
	if err != nil {
		return nil, fmt.Errorf("read quarantine of ps %s: %w", psID, err)
	}
	out := make(map[uint16]time.Time, len(zs))
	for _, z := range zs {
		s, _ := z.Member.(string)
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil {
			continue
		}
		out[uint16(p)] = time.UnixMilli(int64(z.Score))
	}
	return out, nil
}

// Forget removes a PS's lease and port records after its backends were
// withdrawn (a clean shutdown, or a peer's cleanup of a dead PS). The
// quarantine set stays until it runs out.
func (r *Registry) Forget(ctx context.Context, psID string) error {
	pipe := r.rdb.TxPipeline()
	pipe.Del(ctx, r.keys.ps(psID))
	pipe.SRem(ctx, r.keys.pses(), psID)
	r.addChange(ctx, pipe, "ps", psID)
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("forget ps %s: %w", psID, err)
	}
	return nil
}

// CollectDead withdraws the backends of every PS whose lease lapsed more
// than grace ago, quarantining their ports for quarantine, and forgets those
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

// ---- Readers ---------------------------------------------------------------

// Get returns the target's route with its live backends only, or
// ErrNotFound when it has none.
func (r *Registry) Get(ctx context.Context, target netip.AddrPort) (Route, error) {
	raw, err := r.rdb.HGetAll(ctx, r.keys.route(target)).Result()
	if err != nil {
		return Route{}, fmt.Errorf("get route %s: %w", target, err)
	}
	leases, err := r.PSLeases(ctx)
	if err != nil {
		return Route{}, err
	}
	rt := r.buildRoute(target, raw, leases)
	rt.Backends = rt.LiveBackends(r.now())
	if len(rt.Backends) == 0 {
		return Route{}, fmt.Errorf("%s: %w", target, ErrNotFound)
	}
	return rt, nil
}

// List returns every route that has at least one live backend, with its live
// backends, sorted by target.
func (r *Registry) List(ctx context.Context) ([]Route, error) {
	snap, err := r.Snapshot(ctx)
	if err != nil {
		return nil, err
	}
	now := r.now()
	out := make([]Route, 0, len(snap.Routes))
	for _, rt := range snap.Routes {
		rt.Backends = rt.LiveBackends(now)
		if len(rt.Backends) > 0 {
			out = append(out, rt)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Target.Compare(out[j].Target) < 0 })
	return out, nil
}

// Snapshot is the full state of the registry at one moment, with the change
// feed position to follow from.
type Snapshot struct {
	// Routes holds every route with every recorded backend, live or not.
	Routes []Route
	// Leases holds every PS lease.
	Leases map[string]PSLease
	// Cursor is the change feed position taken before the data was read:
	// following from it can only replay changes, never miss one.
	Cursor string
}

// Snapshot reads every route and lease. It pipelines reads in chunks, so
// a million routes take a handful of round trips per chunk, not one each.
func (r *Registry) Snapshot(ctx context.Context) (Snapshot, error) {
	cursor, err := r.lastID(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	leases, err := r.PSLeases(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	var targets []string
	var scur uint64
	for {
		batch, next, err := r.rdb.SScan(ctx, r.keys.targets(), scur, "", 10000).Result()
		if err != nil {
			return Snapshot{}, fmt.Errorf("list targets: %w", err)
		}
		targets = append(targets, batch...)
		if scur = next; scur == 0 {
			break
		}
	}
	routes, err := r.readRoutes(ctx, targets, leases)
	if err != nil {
		return Snapshot{}, err
	}
	return Snapshot{Routes: routes, Leases: leases, Cursor: cursor}, nil
}

// readRoutes reads the route hashes of targets (skipping malformed targets)
// and joins them with leases.
func (r *Registry) readRoutes(ctx context.Context, targets []string, leases map[string]PSLease) ([]Route, error) {
	const chunk = 2000
	out := make([]Route, 0, len(targets))
	for start := 0; start < len(targets); start += chunk {
		end := min(start+chunk, len(targets))
		pipe := r.rdb.Pipeline()
		cmds := make([]*redis.MapStringStringCmd, 0, end-start)
		parsed := make([]netip.AddrPort, 0, end-start)
		for _, t := range targets[start:end] {
			ap, err := netip.ParseAddrPort(t)
			if err != nil {
				r.log.Warn("ignoring malformed target in registry", "target", truncate(t))
				continue
			}
			parsed = append(parsed, ap)
			cmds = append(cmds, pipe.HGetAll(ctx, r.keys.routeRaw(t)))
		}
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("read routes: %w", err)
		}
		for i, c := range cmds {
			rt := r.buildRoute(parsed[i], c.Val(), leases)
			if len(rt.Backends) > 0 {
				out = append(out, rt)
			}
		}
	}
	return out, nil
}

// buildRoute joins a route hash with the PS leases. A backend whose PS has
// no lease at all is kept with a zero expiry (dead), so readers can tell it
// apart from a missing one.
func (r *Registry) buildRoute(target netip.AddrPort, raw map[string]string, leases map[string]PSLease) Route {
	rt := Route{Target: target, Backends: make([]Backend, 0, len(raw))}
	for psID, v := range raw {
		e, err := decodeEntry(v)
		if err != nil {
			r.log.Warn("ignoring malformed backend", "target", target.String(), "ps_id", psID, "err", err)
			continue
		}
		l := leases[psID]
		// Without a lease the address is invalid but the port is kept, so a
		// reader that learns the lease later still knows where to go.
		b := Backend{PSID: psID, AgentID: e.AgentID, ExpiresAt: l.ExpiresAt, Draining: l.State == PSDraining,
			Address: netip.AddrPortFrom(l.Addr, e.Port)}
		rt.Backends = append(rt.Backends, b)
	}
	sort.Slice(rt.Backends, func(i, j int) bool { return rt.Backends[i].PSID < rt.Backends[j].PSID })
	return rt
}

func (r *Registry) addChange(ctx context.Context, pipe redis.Pipeliner, kind, id string) {
	pipe.XAdd(ctx, &redis.XAddArgs{Stream: r.keys.changes(), MaxLen: r.maxLen, Approx: true, Values: []any{"k", kind, "id", id}})
}

func validPSID(id string) error {
	if id == "" || len(id) > 128 || strings.ContainsAny(id, " \t\r\n{}:") {
		return fmt.Errorf("ps id %q: must be 1-128 characters without blanks, braces or colons", truncate(id))
	}
	return nil
}
