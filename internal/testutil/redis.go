package testutil

import (
	"context"
	"testing"

	"github.com/tether-net/tether/internal/redisproc"
)

// Redis is a real redis-server started for one test, on a free loopback
// port, with its own data directory (AOF on, so a restart keeps the data).
// It is a testing wrapper over redisproc: failures fail the test.
type Redis struct {
	t   testing.TB
	srv *redisproc.Server
}

// StartRedis starts redis-server for t and stops it in t's cleanup. The
// server's log is printed if the test fails.
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	bin := RequireBinary(t, "redis-server")
	srv, err := redisproc.Start(context.Background(), redisproc.Options{Bin: bin, Dir: t.TempDir(), Persist: true})
	if err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Logf("stop redis-server: %v", err)
		}
		if t.Failed() {
			t.Logf("redis-server log:\n%s", srv.Log())
		}
	})
	return &Redis{t: t, srv: srv}
}

// Addr is host:port of the server.
func (r *Redis) Addr() string { return r.srv.Addr() }

// URL is the redis:// URL of the server.
func (r *Redis) URL() string { return r.srv.URL() }

// Start starts the server (again, after Stop) on the same port and data
// directory, and waits until it answers PING.
func (r *Redis) Start() {
	r.t.Helper()
	// Not t.Context(): that ends before cleanups run, and a cleanup may
	// restart the server; redisproc's own timeout bounds the wait.
	if err := r.srv.Start(context.Background()); err != nil {
		r.t.Fatalf("start redis-server: %v", err)
	}
}

// Stop stops the server with SIGTERM (it finishes writing its AOF) and
// waits for it to exit. Stopping a stopped server does nothing.
func (r *Redis) Stop() {
	if err := r.srv.Stop(); err != nil {
		r.t.Logf("stop redis-server: %v", err)
	}
}

// Kill stops the server with SIGKILL, as a crash would.
func (r *Redis) Kill() { _ = r.srv.Kill() }

// Dir is the server's data directory.
func (r *Redis) Dir() string { return r.srv.Dir() }
