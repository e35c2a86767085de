package agent

import (
	"bytes"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// A target that keeps failing is logged at info once per interval, with
// the failures left out counted; each target has its own interval.
func TestDialFailuresAreLoggedRateLimitedPerTarget(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	now := time.Unix(1000, 0)
	d := newDialFailures(10*time.Second, func() time.Time { return now })
	a := netip.MustParseAddrPort("198.18.1.11:9100")
	b := netip.MustParseAddrPort("198.18.1.11:9200")
	refused := errors.New("connect: connection refused")

	for range 5 {
		d.failed(log, a, "127.0.0.1:9100", "dial_refused", refused)
		now = now.Add(time.Second)
	}
	d.failed(log, b, "127.0.0.1:9200", "dial_timeout", refused)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("5 failures of one target and 1 of another within 10 s: %d lines, want 2:\n%s", len(lines), buf.String())
	}
	for _, want := range []string{"level=INFO", "target=198.18.1.11:9100", "dial=127.0.0.1:9100", "code=dial_refused", "connection refused", "suppressed=0"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("first line %q lacks %q", lines[0], want)
		}
	}
	if !strings.Contains(lines[1], "target=198.18.1.11:9200") {
		t.Errorf("the other target's first failure was not logged: %q", lines[1])
	}

	now = now.Add(6 * time.Second) // 11 s after the first line
	buf.Reset()
	d.failed(log, a, "127.0.0.1:9100", "dial_refused", refused)
	if got := buf.String(); !strings.Contains(got, "target=198.18.1.11:9100") || !strings.Contains(got, "suppressed=4") {
		t.Fatalf("after the interval: %q, want one line counting the 4 failures left out", got)
	}
}
