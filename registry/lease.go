package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

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
	r.addChange(ctx, pipe, ChangePS, l.ID)
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

// readLeases reads the leases of ids in one pipeline. Ids without a lease
// are left out; malformed leases are logged and left out, so one bad record
// cannot hide every other PS.
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
	return PSLease{ID: id, Addr: addr, State: st, ExpiresAt: time.UnixMilli(ms)}, nil
}
