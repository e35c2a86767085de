package registry

import (
	"context"
	"strconv"
	"strings"
	"time"
)

// changeTimeKey carries, in the context of a Sink.Update call, when the
// oldest change it applies was written to the change feed.
type changeTimeKey struct{}

// ChangeTime returns when the oldest registry change behind a Sink.Update
// call was written: the millisecond timestamp of its change feed entry id,
// on Redis's clock. ok is false for calls that do not come from the change
// feed (full loads, merges after a data loss, local lease expiry).
//
// The time is Redis's wall clock: a sink comparing it with its own clock
// measures the skew between the two hosts too.
func ChangeTime(ctx context.Context) (t time.Time, ok bool) {
	t, ok = ctx.Value(changeTimeKey{}).(time.Time)
	return t, ok
}

// withChangeTime attaches t (when valid) for ChangeTime.
func withChangeTime(ctx context.Context, t time.Time) context.Context {
	if t.IsZero() {
		return ctx
	}
	return context.WithValue(ctx, changeTimeKey{}, t)
}

// streamIDTime is the time in a Redis stream entry id ("<ms>-<seq>"), zero
// for an id that does not hold one.
func streamIDTime(id string) time.Time {
	ms, _, _ := strings.Cut(id, "-")
	n, err := strconv.ParseInt(ms, 10, 64)
	if err != nil || n <= 0 {
		return time.Time{}
	}
	return time.UnixMilli(n)
}
