package redisproc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tether-net/tether/internal/execpath"
)

// ErrNotInstalled means no redis-server binary was found.
var ErrNotInstalled = errors.New("redis-server is not installed (run scripts/setup.sh)")

// Options configures a Server. The zero value is a throwaway server without
// persistence, in a temporary directory that Close removes.
type Options struct {
	// Bin is the redis-server binary; default: found by LookPath.
	Bin string
	// Dir is the data directory, which also holds the server's log
	// (redis.log); default a new temporary directory, removed by Close. A
	// Dir given here is left in place.
	Dir string
	// Persist turns on the append-only file, fsynced on every write, so the
	// data survive Stop or Kill and the next Start. Off, the server keeps
	// nothing on disk and a restart begins empty.
	Persist bool
	// ReadyTimeout bounds each wait for the server to answer; default 10s.
	// The ctx given to Start may end the wait sooner.
	ReadyTimeout time.Duration
}

// Server is a redis-server child process on 127.0.0.1. Its methods are safe
// for concurrent use.
type Server struct {
	bin          string
	dir          string
	ownDir       bool
	port         int
	persist      bool
	readyTimeout time.Duration

	mu     sync.Mutex
	cmd    *exec.Cmd     // nil while stopped
	exited chan struct{} // closed once cmd has exited and been reaped
}

// stopGrace is how long Stop lets redis-server finish writing its data
// after SIGTERM before it kills it.
const stopGrace = 10 * time.Second

// Start starts redis-server on a free loopback port and returns once it
// answers PING. ctx bounds only that wait: the server runs until Stop, Kill
// or Close.
func Start(ctx context.Context, opt Options) (*Server, error) {
	s := &Server{bin: opt.Bin, dir: opt.Dir, persist: opt.Persist, readyTimeout: opt.ReadyTimeout}
	if s.readyTimeout <= 0 {
		s.readyTimeout = 10 * time.Second
	}
	if s.bin == "" {
		bin, err := LookPath()
		if err != nil {
			return nil, err
		}
		s.bin = bin
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s.port = port
	if s.dir == "" {
		dir, err := os.MkdirTemp("", "tether-redis-")
		if err != nil {
			return nil, fmt.Errorf("redis-server data directory: %w", err)
		}
		s.dir, s.ownDir = dir, true
	}
	if err := s.Start(ctx); err != nil {
		if s.ownDir {
			_ = os.RemoveAll(s.dir)
		}
		return nil, err
	}
	return s, nil
}

// LookPath finds redis-server (see package execpath for where it looks).
func LookPath() (string, error) {
	p, err := execpath.Look("redis-server")
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrNotInstalled, err)
	}
	return p, nil
}

// Addr is host:port of the server.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is the redis:// URL of the server's database 0.
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

// Dir is the server's data directory.
func (s *Server) Dir() string { return s.dir }

// Log returns what the server has written to its log so far, across
// restarts; "" if there is none yet.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.logPath())
	return string(b)
}

func (s *Server) logPath() string { return filepath.Join(s.dir, "redis.log") }

// Start starts the server again after Stop or Kill, on the same port and
// data directory, and returns once it answers PING (with Persist, that is
// once it has loaded its data). It fails if the server is running.
func (s *Server) Start(ctx context.Context) error {
	exited, err := s.spawn()
	if err != nil {
		return err
	}
	if err := s.waitReady(ctx, exited); err != nil {
		_ = s.Kill()
		return fmt.Errorf("redis-server on %s: %w%s", s.Addr(), err, s.logTail())
	}
	return nil
}

func (s *Server) spawn() (<-chan struct{}, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		select {
		case <-s.exited:
			// It died on its own (a crash, or an operator's kill): starting
			// again is what a test of recovery wants.
		default:
			return nil, fmt.Errorf("redis-server on %s is already running", s.Addr())
		}
	}
	persist := []string{"--appendonly", "no"}
	if s.persist {
		persist = []string{"--appendonly", "yes", "--appendfsync", "always"}
	}
	args := append([]string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--dir", s.dir,
		"--save", "", "--protected-mode", "no", "--daemonize", "no", "--logfile", "",
	}, persist...)
	// The log goes to a file rather than a pipe: no copying goroutine, it
	// survives restarts (appended), and it is there to read after a crash.
	logf, err := os.OpenFile(s.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("redis-server log: %w", err)
	}
	defer logf.Close() // the child holds its own descriptor
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = dieWithParent()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited
	return exited, nil
}

// waitReady probes the server with PING every 20 ms until it answers,
// exits, or the wait times out.
func (s *Server) waitReady(ctx context.Context, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, s.readyTimeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := ping(ctx, s.Addr())
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return errors.New("exited before it was ready")
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w (last probe: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

// ping sends one PING and expects +PONG. A server still loading its data
// answers -LOADING, which counts as not ready.
func ping(ctx context.Context, addr string) error {
	d := net.Dialer{Timeout: 200 * time.Millisecond}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(500 * time.Millisecond)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line = strings.TrimSpace(line); line != "+PONG" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// logTail returns the end of the log, formatted to follow an error.
func (s *Server) logTail() string {
	log := s.Log()
	if log == "" {
		return ""
	}
	const max = 2000
	if len(log) > max {
		log = "..." + log[len(log)-max:]
	}
	return "; its log:\n" + log
}

// Stop stops the server with SIGTERM, so it finishes writing its data, and
// waits for it to exit; a server that takes longer than 10s is killed, and
// Stop says so. Stopping a stopped server does nothing.
func (s *Server) Stop() error {
	cmd, exited := s.take()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-exited:
		return nil
	case <-t.C:
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("redis-server on %s ignored SIGTERM for %v and was killed", s.Addr(), stopGrace)
	}
}

// Kill stops the server with SIGKILL, as a crash would, and waits for it to
// exit. Killing a stopped server does nothing.
func (s *Server) Kill() error {
	cmd, exited := s.take()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Kill()
	<-exited
	return nil
}

// Restart stops the server with SIGTERM and starts it again on the same
// port and data directory.
func (s *Server) Restart(ctx context.Context) error {
	if err := s.Stop(); err != nil {
		return err
	}
	return s.Start(ctx)
}

// Close stops the server and removes its data directory if Start made it.
func (s *Server) Close() error {
	err := s.Stop()
	if s.ownDir {
		if rerr := os.RemoveAll(s.dir); rerr != nil && err == nil {
			err = fmt.Errorf("remove redis-server data directory: %w", rerr)
		}
	}
	return err
}

// take hands the running process to the caller that stops it, so that two
// concurrent Stop or Kill calls do not both wait on it.
func (s *Server) take() (*exec.Cmd, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd, exited := s.cmd, s.exited
	s.cmd, s.exited = nil, nil
	return cmd, exited
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
