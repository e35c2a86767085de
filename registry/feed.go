package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-net/tether/internal/textclip"
)

// ChangeKind says which kind of key a change entry names.
type ChangeKind string

// Change kinds.
const (
	ChangeRoute ChangeKind = "route" // ID is a target ip:port
	ChangePS    ChangeKind = "ps"    // ID is a PS id
)

// Change is one entry of the change feed.
type Change struct {
	Cursor string // the entry's stream id; resume after it
	Kind   ChangeKind
	ID     string
}

// addChange queues a change entry naming kind and id on pipe, so it is
// written in the same transaction as the change itself.
func (r *Registry) addChange(ctx context.Context, pipe redis.Pipeliner, kind ChangeKind, id string) {
	pipe.XAdd(ctx, &redis.XAddArgs{Stream: r.keys.changes(), MaxLen: r.maxLen, Approx: true, Values: []any{"k", string(kind), "id", id}})
}

// ErrFeedReset is wrapped, with ErrCursorLost, by the errors of
// ReadChanges that mean the registry lost data rather than that the reader
// fell behind: the stream is gone, or is shorter than the reader's cursor
// (a FLUSHALL, a restart without persistence, a failover to a replica that
// lacked the latest writes).
var ErrFeedReset = errors.New("change feed reset: the registry lost data")

// Generation returns the registry's generation: a random id the first PS
// lease write stores when the registry has none. It changes only when the
// registry lost its data (and a PS wrote again), so a reader that sees it
// change knows that what is absent may merely not be written back yet. ""
// means none is stored (an empty registry, or one that just lost its data).
func (r *Registry) Generation(ctx context.Context) (string, error) {
	g, err := r.rdb.Get(ctx, r.keys.generation()).Result()
	if errors.Is(err, redis.Nil) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read registry generation: %w", err)
	}
	return g, nil
}

// emptyCursor is the position before the first entry ever written.
const emptyCursor = "0-0"

// lastID returns the id of the newest entry, or 0-0 for an empty stream.
func (r *Registry) lastID(ctx context.Context) (string, error) {
	info, err := r.rdb.XInfoStream(ctx, r.keys.changes()).Result()
	if err != nil {
		if isNoSuchKey(err) {
			return emptyCursor, nil
		}
		return "", fmt.Errorf("read change feed position: %w", err)
	}
	return info.LastGeneratedID, nil
}

// ReadChanges returns up to count changes after cursor, blocking up to block
// for the first one (0 returns at once). It returns ErrCursorLost when
// entries after cursor were trimmed away or the stream was reset, so the
// caller must take a fresh Snapshot.
func (r *Registry) ReadChanges(ctx context.Context, cursor string, count int64, block time.Duration) ([]Change, error) {
	if err := r.checkCursor(ctx, cursor); err != nil {
		return nil, err
	}
	args := &redis.XReadArgs{Streams: []string{r.keys.changes(), cursor}, Count: count, Block: block}
	if block <= 0 {
		args.Block = -1 // go-redis: negative means no BLOCK argument
	}
	res, err := r.rdb.XRead(ctx, args).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read change feed: %w", err)
	}
	// Trimming may have happened while XREAD was blocked, after the check
	// above: check again now that entries arrived, or the reader would
	// silently skip what was trimmed between its cursor and them.
	if err := r.checkCursor(ctx, cursor); err != nil {
		return nil, err
	}
	var out []Change
	for _, s := range res {
		for _, m := range s.Messages {
			k, _ := m.Values["k"].(string)
			id, _ := m.Values["id"].(string)
			out = append(out, Change{Cursor: m.ID, Kind: ChangeKind(k), ID: id})
		}
	}
	return out, nil
}

// checkCursor detects a feed that can no longer be followed from cursor:
// the entry right after it was trimmed, or the stream's history is shorter
// than the cursor (Redis lost its data, or a failover to a lagging replica).
func (r *Registry) checkCursor(ctx context.Context, cursor string) error {
	if cursor == "" {
		return fmt.Errorf("%w: empty cursor", ErrCursorLost)
	}
	info, err := r.rdb.XInfoStream(ctx, r.keys.changes()).Result()
	if err != nil {
		if isNoSuchKey(err) {
			if cursor == emptyCursor {
				return nil
			}
			return fmt.Errorf("%w: %w: change feed is gone (was at %s)", ErrCursorLost, ErrFeedReset, cursor)
		}
		return fmt.Errorf("read change feed position: %w", err)
	}
	if compareIDs(cursor, info.LastGeneratedID) > 0 {
		return fmt.Errorf("%w: %w: cursor %s is past the feed's last entry %s", ErrCursorLost, ErrFeedReset, cursor, info.LastGeneratedID)
	}
	// Entries only leave the stream by trimming (or an operator's XDEL). If
	// the oldest entry kept is newer than the cursor and anything was ever
	// removed, entries after the cursor may be gone: resync. (A cursor whose
	// own entry was trimmed while everything after it was kept is caught
	// too; the cost of that false alarm is one full load.)
	trimmed := info.EntriesAdded > info.Length
	if info.Length > 0 && trimmed && compareIDs(info.FirstEntry.ID, cursor) > 0 {
		return fmt.Errorf("%w: entries after %s were trimmed (oldest kept is %s)", ErrCursorLost, cursor, info.FirstEntry.ID)
	}
	if info.MaxDeletedEntryID != "" && compareIDs(info.MaxDeletedEntryID, cursor) > 0 {
		return fmt.Errorf("%w: entries after %s were deleted (up to %s)", ErrCursorLost, cursor, info.MaxDeletedEntryID)
	}
	return nil
}

func isNoSuchKey(err error) bool {
	return err != nil && strings.Contains(strings.ToLower(err.Error()), "no such key")
}

// compareIDs compares two stream ids "ms-seq".
func compareIDs(a, b string) int {
	am, as := splitID(a)
	bm, bs := splitID(b)
	switch {
	case am < bm:
		return -1
	case am > bm:
		return 1
	case as < bs:
		return -1
	case as > bs:
		return 1
	}
	return 0
}

func splitID(id string) (uint64, uint64) {
	ms, seq, _ := strings.Cut(id, "-")
	m, _ := strconv.ParseUint(ms, 10, 64)
	s, _ := strconv.ParseUint(seq, 10, 64)
	return m, s
}

// Refresh re-reads the keys named by changes: the routes they name and the
// leases of the PS nodes they name. Routes without any backend come back
// with no backends (deleted). It is how a reader applies a batch of changes.
func (r *Registry) Refresh(ctx context.Context, changes []Change) (routes []Route, leases map[string]PSLease, goneLeases []string, err error) {
	var targets []string
	var psIDs []string
	seenT := map[string]bool{}
	seenP := map[string]bool{}
	for _, c := range changes {
		switch c.Kind {
		case ChangeRoute:
			if !seenT[c.ID] {
				seenT[c.ID] = true
				targets = append(targets, c.ID)
			}
		case ChangePS:
			if !seenP[c.ID] {
				seenP[c.ID] = true
				psIDs = append(psIDs, c.ID)
			}
		default:
			r.log.Warn("ignoring change of unknown kind", "kind", textclip.Short(string(c.Kind)), "id", textclip.Short(c.ID))
		}
	}
	leases, err = r.readLeases(ctx, psIDs)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, id := range psIDs {
		if _, ok := leases[id]; !ok {
			goneLeases = append(goneLeases, id)
		}
	}
	if len(targets) == 0 {
		return nil, leases, goneLeases, nil
	}
	// Routes are joined with the leases the caller holds; here we only need
	// the raw entries, so join with every lease we know now.
	all, err := r.PSLeases(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	routes = make([]Route, 0, len(targets))
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, 0, len(targets))
	parsed := make([]netip.AddrPort, 0, len(targets))
	for _, t := range targets {
		ap, err := netip.ParseAddrPort(t)
		if err != nil {
			r.log.Warn("ignoring change for malformed target", "target", textclip.Short(t))
			continue
		}
		parsed = append(parsed, ap)
		cmds = append(cmds, pipe.HGetAll(ctx, r.keys.routeRaw(t)))
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, nil, nil, fmt.Errorf("refresh routes: %w", err)
	}
	for i, c := range cmds {
		routes = append(routes, r.buildRoute(parsed[i], c.Val(), all))
	}
	return routes, leases, goneLeases, nil
}
