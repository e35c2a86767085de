package daemon

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// serveForTest runs Serve on a free loopback port until the test ends and
// returns its address.
func serveForTest(t *testing.T, probes Probes) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, "127.0.0.1:0", prometheus.NewRegistry(), slog.New(slog.DiscardHandler),
			func(a net.Addr) { addrc <- a.String() }, probes)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case a := <-addrc:
		return a
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	return ""
}

func get(t *testing.T, addr, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

func TestReadyzSaysWhyNotThenReady(t *testing.T) {
	var ready atomic.Bool
	addr := serveForTest(t, Probes{Ready: func() error {
		if !ready.Load() {
			return errors.Join(errors.New("no tunnel up yet"), errors.New("endpoint x refused"))
		}
		return nil
	}})
	code, body := get(t, addr, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no tunnel up yet") || !strings.Contains(body, "endpoint x refused") {
		t.Fatalf("/readyz before ready: %d %q, want 503 with both reasons", code, body)
	}
	if code, body := get(t, addr, "/healthz"); code != http.StatusOK || body != "ok" {
		t.Fatalf("/healthz of a daemon that is not ready yet: %d %q, want 200 ok", code, body)
	}
	ready.Store(true)
	if code, body := get(t, addr, "/readyz"); code != http.StatusOK || body != "ready" {
		t.Fatalf("/readyz when ready: %d %q", code, body)
	}
}

func TestReadyzWithoutACheckIsReady(t *testing.T) {
	addr := serveForTest(t, Probes{})
	if code, body := get(t, addr, "/readyz"); code != http.StatusOK || body != "ready" {
		t.Fatalf("/readyz: %d %q", code, body)
	}
}

// A watchdog whose loop stops beating turns /healthz bad; beats again
// make it good.
func TestHealthzFailsWhenTheWatchdogStalls(t *testing.T) {
	now := time.Unix(1000, 0)
	w := NewWatchdog("lease loop", 5*time.Second)
	w.now = func() time.Time { return now }
	w.Beat()
	addr := serveForTest(t, Probes{Health: []func() error{w.Check}})
	if code, body := get(t, addr, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz with a fresh beat: %d %q", code, body)
	}
	now = now.Add(6 * time.Second)
	code, body := get(t, addr, "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "lease loop stuck") {
		t.Fatalf("/healthz 6 s after the last beat: %d %q, want 503 naming the loop", code, body)
	}
	w.Beat()
	if code, body := get(t, addr, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz after a new beat: %d %q", code, body)
	}
}

func TestWatchdogTickBeats(t *testing.T) {
	w := NewWatchdog("process watchdog", 50*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Tick(ctx, 5*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	if err := w.Check(); err != nil {
		t.Fatalf("a ticking watchdog: %v", err)
	}
	cancel()
	time.Sleep(200 * time.Millisecond)
	if err := w.Check(); err == nil {
		t.Fatal("a watchdog that stopped ticking 200 ms ago (limit 50 ms) passes")
	}
}
