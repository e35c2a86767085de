package registry

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// skewed is a clock off from the host's by d (keeping the monotonic
// reading, as a host whose wall clock is wrong still has one).
func skewed(d time.Duration) func() time.Time {
	return func() time.Time { return time.Now().Add(d) }
}

// A PS or a reader whose clock is 10s off must neither lose live routes nor
// keep a dead PS alive: lease expiry is judged on Redis's clock, and a
// reader converts it to its own.
func TestLeaseExpiryIsJudgedOnOneClock(t *testing.T) {
	rd := testutil.StartRedis(t)
	for i, c := range []struct {
		name           string
		writer, reader time.Duration
	}{
		{"writer 10s fast", 10 * time.Second, 0},
		{"writer 10s slow", -10 * time.Second, 0},
		{"reader 10s fast", 0, 10 * time.Second},
		{"reader 10s slow", 0, -10 * time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			prefix := fmt.Sprintf("skew%d", i)
			writer, err := New(Config{URL: rd.URL(), Prefix: prefix, Now: skewed(c.writer)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { writer.Close() })
			reader, err := New(Config{URL: rd.URL(), Prefix: prefix, Now: skewed(c.reader)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { reader.Close() })
			checkOneClock(t, writer, reader)
		})
	}
}

// checkOneClock runs a PS (writer) that renews a 2s lease every second for
// 5s and then stops, while a reader with its own clock watches its route
// through Get, a Mirror, CollectDead and a rival publication.
func checkOneClock(t *testing.T, writer, reader *Registry) {
	ctx := context.Background()
	const lease = 2 * time.Second
	target := ap("127.77.0.1:9100")
	// The PS states its lease on its own clock, as a PS always did: the
	// registry must send only the duration.
	renew := func() error {
		return writer.RenewPS(ctx, lease1("ps1", writer.now().Add(lease)))
	}
	if err := renew(); err != nil {
		t.Fatal(err)
	}
	mustPublish(t, writer, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1"})
	m := startMirror(t, reader, nil, time.Hour, nil)

	liveErr := func() error {
		if _, err := reader.Get(ctx, target); err != nil {
			return fmt.Errorf("Get: %w", err)
		}
		if bs, _ := m.Lookup(target); len(bs) != 1 || !bs[0].Live {
			return fmt.Errorf("mirror: %s", describe(bs))
		}
		return nil
	}

	// (1) While the PS renews, every reader sees it live, another PS cannot
	// take its target, and no collector takes it for dead.
	var lastRenew time.Time
	for i := range 5 {
		lastRenew = time.Now()
		if err := renew(); err != nil {
			t.Fatal(err)
		}
		for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
			if err := liveErr(); err != nil {
				t.Fatalf("a renewing PS looked dead %v after its renewal: %v", time.Since(lastRenew).Round(time.Millisecond), err)
			}
		}
		if i == 2 {
			errs, err := reader.Publish(ctx, "ps2", []Publication{{Target: target, Port: 30001, AgentID: "rival"}})
			if err != nil || !errors.Is(errs[0], ErrConflict) {
				t.Fatalf("a rival took the live PS's target: %v %v", errs, err)
			}
			if dead, err := reader.CollectDead(ctx, lease, time.Minute); err != nil || len(dead) != 0 {
				t.Fatalf("a live PS was collected: %v %v", dead, err)
			}
		}
	}

	// (2) It stops: every reader marks it dead within the lease and a wide
	// slack, never a skew late; and not long before the lease ran out.
	deadline := lastRenew.Add(lease + 2*time.Second)
	var getDead, mirrorDead time.Time
	for getDead.IsZero() || mirrorDead.IsZero() {
		now := time.Now()
		if now.After(lastRenew.Add(lease + 15*time.Second)) {
			break
		}
		if _, err := reader.Get(ctx, target); errors.Is(err, ErrNotFound) && getDead.IsZero() {
			getDead = now
		}
		if bs, _ := m.Lookup(target); (len(bs) == 0 || !bs[0].Live) && mirrorDead.IsZero() {
			mirrorDead = now
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, d := range []struct {
		who string
		at  time.Time
	}{{"Get", getDead}, {"the mirror", mirrorDead}} {
		switch {
		case d.at.IsZero():
			t.Errorf("%s still saw the PS live %v after its last renewal (lease %v)", d.who, time.Since(lastRenew).Round(time.Millisecond), lease)
		case d.at.After(deadline):
			t.Errorf("%s saw the PS dead %v after its last renewal, want at most %v", d.who, d.at.Sub(lastRenew).Round(time.Millisecond), deadline.Sub(lastRenew))
		case d.at.Before(lastRenew.Add(lease / 2)):
			t.Errorf("%s saw the PS dead %v after its last renewal, before half its %v lease", d.who, d.at.Sub(lastRenew).Round(time.Millisecond), lease)
		default:
			t.Logf("%s saw the PS dead %v after its last renewal (lease %v)", d.who, d.at.Sub(lastRenew).Round(time.Millisecond), lease)
		}
	}
	// Redis's own judgement (the publish script) frees the target too.
	testutil.Eventually(t, 3*time.Second, "a rival takes the dead PS's target", func() error {
		errs, err := reader.Publish(ctx, "ps2", []Publication{{Target: target, Port: 30001, AgentID: "rival"}})
		return errors.Join(append(errs, err)...)
	})
}

// lease1 is a lease of ps id at 127.0.0.1 until until.
func lease1(id string, until time.Time) PSLease { return lease(id, "127.0.0.1", until) }

// A quarantine is written by one process and read by another (a peer's
// CollectDead, then the restarted PS): it too is kept on Redis's clock, so
// a skewed writer neither shortens nor stretches it for the reader.
func TestQuarantineIsKeptOnOneClock(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reader := newTestRegistry(t, rd.URL(), nil)
	for i, skew := range []time.Duration{10 * time.Second, -10 * time.Second} {
		writer := newTestRegistry(t, rd.URL(), skewed(skew))
		port := uint16(20001 + i)
		if err := writer.Release(ctx, "ps1", []Publication{{Target: ap("127.77.0.1:1"), Addr: lo(port).Addr(), Port: port}}, writer.now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		q, err := reader.Quarantined(ctx, "ps1")
		if err != nil {
			t.Fatal(err)
		}
		if err := nearErr(q[lo(port)], time.Now().Add(time.Minute)); err != nil {
			t.Errorf("a minute's quarantine written by a PS %v off: %v", skew, err)
		}
	}
}
