package redisproc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// do sends one command over a fresh connection and returns the first line
// of the reply: enough to check a server without a Redis client library.
func do(t *testing.T, addr string, args ...string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	req := fmt.Sprintf("*%d\r\n", len(args))
	for _, a := range args {
		req += fmt.Sprintf("$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "$") && line != "$-1" {
		val, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(val)
	}
	return line
}

func start(t *testing.T, opt Options) *Server {
	t.Helper()
	if _, err := LookPath(); err != nil {
		t.Skip(err)
	}
	s, err := Start(t.Context(), opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func TestAPersistentServerKeepsItsDataAcrossACrashAndAStop(t *testing.T) {
	s := start(t, Options{Persist: true, Dir: t.TempDir()})
	if got := do(t, s.Addr(), "SET", "k", "v1"); got != "+OK" {
		t.Fatalf("SET: %s", got)
	}
	addr := s.Addr()
	if err := s.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		t.Fatal("a killed server still accepts connections")
	}
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if s.Addr() != addr {
		t.Fatalf("restart moved the server from %s to %s", addr, s.Addr())
	}
	if got := do(t, s.Addr(), "GET", "k"); got != "v1" {
		t.Fatalf("after a crash, GET k = %q, want v1", got)
	}
	if err := s.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := do(t, s.Addr(), "GET", "k"); got != "v1" {
		t.Fatalf("after a restart, GET k = %q, want v1", got)
	}
	if !strings.Contains(s.Log(), "Ready to accept connections") {
		t.Errorf("the log lacks the server's own lines:\n%s", s.Log())
	}
}

func TestAThrowawayServerStartsEmptyAndCleansUp(t *testing.T) {
	s := start(t, Options{})
	do(t, s.Addr(), "SET", "k", "v1")
	if err := s.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := do(t, s.Addr(), "GET", "k"); got != "$-1" {
		t.Fatalf("a server without persistence kept data: GET k = %q", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Close left the temporary directory: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("stopping a stopped server: %v", err)
	}
}

func TestStartingARunningServerFails(t *testing.T) {
	s := start(t, Options{})
	if err := s.Start(t.Context()); err == nil {
		t.Fatal("a second Start of a running server succeeded")
	}
	if got := do(t, s.Addr(), "PING"); got != "+PONG" {
		t.Fatalf("the failed Start disturbed the running server: %s", got)
	}
}

func TestAServerThatExitsAtOnceIsReportedWithoutWaiting(t *testing.T) {
	begin := time.Now()
	_, err := Start(context.Background(), Options{Bin: "/bin/false", ReadyTimeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("want an early-exit error, got %v", err)
	}
	if d := time.Since(begin); d > 10*time.Second {
		t.Fatalf("an early exit took %v to report", d)
	}
}

func TestAMissingBinaryIsAClearError(t *testing.T) {
	_, err := Start(context.Background(), Options{Bin: "/nonexistent/redis-server"})
	if err == nil || !strings.Contains(err.Error(), "start redis-server") {
		t.Fatalf("want a start error, got %v", err)
	}
}
