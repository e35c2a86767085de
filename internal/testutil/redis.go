package testutil

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Redis is a real redis-server started for one test, on a free loopback
// port, with its own data directory (AOF on, so a restart keeps the data).
type Redis struct {
	t    testing.TB
	bin  string
	dir  string
	port int

	mu  sync.Mutex
	cmd *exec.Cmd
	log *bytes.Buffer
}

// StartRedis starts redis-server for t and stops it in t's cleanup. The
// server's log is printed if the test fails.
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	bin := RequireBinary(t, "redis-server")
	r := &Redis{t: t, bin: bin, dir: t.TempDir(), port: FreePort(t)}
	r.Start()
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			r.mu.Lock()
			t.Logf("redis-server log:\n%s", r.log.String())
			r.mu.Unlock()
		}
	})
	return r
}

// Addr is host:port of the server.
func (r *Redis) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)) }

// URL is the redis:// URL of the server.
func (r *Redis) URL() string { return "redis://" + r.Addr() + "/0" }

// Start starts the server (again, after Stop) on the same port and data
// directory, and waits until it accepts connections.
func (r *Redis) Start() {
	r.t.Helper()
	r.mu.Lock()
	if r.log == nil {
		r.log = new(bytes.Buffer)
	}
	cmd := exec.Command(r.bin,
		"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--dir", r.dir, "--appendonly", "yes", "--appendfsync", "always",
		"--save", "", "--protected-mode", "no", "--daemonize", "no",
		"--logfile", "")
	cmd.Stdout, cmd.Stderr = r.log, r.log
	cmd.SysProcAttr = dieWithParent()
	if err := cmd.Start(); err != nil {
		r.mu.Unlock()
		r.t.Fatalf("start redis-server: %v", err)
	}
	r.cmd = cmd
	r.mu.Unlock()
	WaitTCP(r.t, r.Addr(), 10*time.Second)
}

// Stop stops the server with SIGTERM (it finishes writing its AOF) and
// waits for it to exit. Stopping a stopped server does nothing.
func (r *Redis) Stop() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Kill stops the server with SIGKILL, as a crash would.
func (r *Redis) Kill() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}

// Dir is the server's data directory.
func (r *Redis) Dir() string { return r.dir }

func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or sbin directories", name)
}
