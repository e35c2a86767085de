package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clientEnv makes the test binary a plain HTTP client (an unmodified Go
// program) started inside the client cgroup on the central host.
const clientEnv = "TETHER_E2E_CLIENT"

// clientMaxEnv bounds how long a loop client runs if nobody stops it.
const clientMaxEnv = "E2E_MAX_DURATION"

// requestTimeout bounds every request of the client, connect included:
// a regression shows up as a failed request, never as a hang.
const requestTimeout = 2 * time.Second

// sample is one request of the loop client, printed as one JSON line.
type sample struct {
	Start  int64  `json:"start"` // unix ns, when the request began
	End    int64  `json:"end"`   // unix ns, when its outcome was known
	Target string `json:"target"`
	Result string `json:"result"`           // resultOK, resultFailed or resultWrong
	Detail string `json:"detail,omitempty"` // the error, or the wrong answer
}

const (
	resultOK     = "ok"
	resultFailed = "failed"
	resultWrong  = "wrong"
	// loopDone is the loop client's last line: every sample was printed.
	loopDone = "loop done"
)

func (s sample) start() time.Time { return time.Unix(0, s.Start) }
func (s sample) end() time.Time   { return time.Unix(0, s.End) }

// clientMain: "loop" requests every target (ip:port=expected-name, comma
// separated) round-robin, a new connection each time, until SIGTERM (or
// E2E_MAX_DURATION), printing one sample per request; "each" requests every
// target once and prints ok=N failed=M.
func clientMain(mode, arg string) int {
	var targets []struct{ addr, want string }
	for _, t := range strings.Split(arg, ",") {
		addr, want, _ := strings.Cut(t, "=")
		targets = append(targets, struct{ addr, want string }{addr, want})
	}
	switch mode {
	case "each":
		ok, failed := 0, 0
		for _, t := range targets {
			got, err := ask(t.addr)
			if err != nil || got != t.want {
				failed++
				fmt.Printf("%s: got %q err=%v\n", t.addr, got, err)
				continue
			}
			ok++
		}
		fmt.Printf("ok=%d failed=%d\n", ok, failed)
		return 0
	case "loop":
		max, err := time.ParseDuration(os.Getenv(clientMaxEnv))
		if err != nil {
			max = 2 * time.Minute
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
		defer stop()
		ctx, cancel := context.WithTimeout(ctx, max)
		defer cancel()
		n := 0
		for i := 0; ctx.Err() == nil; i++ {
			t := targets[i%len(targets)]
			s := sample{Start: time.Now().UnixNano(), Target: t.addr}
			got, err := ask(t.addr)
			s.End = time.Now().UnixNano()
			switch {
			case err != nil:
				s.Result, s.Detail = resultFailed, err.Error()
			case got != t.want:
				s.Result, s.Detail = resultWrong, got
			default:
				s.Result = resultOK
			}
			b, _ := json.Marshal(s)
			fmt.Println(string(b))
			n++
			if err != nil {
				time.Sleep(20 * time.Millisecond)
			}
		}
		fmt.Printf("%s: %d requests\n", loopDone, n)
		return 0
	case "hold":
		return holdMain(targets)
	}
	return 2
}

// holdEvent is one line of the hold client: a connection that ended.
type holdEvent struct {
	Target string `json:"target"`
	End    int64  `json:"end"` // unix ns
	// Aborted: the socket was destroyed on this host (ECONNABORTED), which
	// only the redirector's destroyer does; otherwise Detail says why it ended.
	Aborted bool   `json:"aborted"`
	Detail  string `json:"detail,omitempty"`
}

// holdReady is the hold client's line once every connection is held.
const holdReady = "holding"

// holdMain opens one connection to every target (an echo service), checks
// that each carries a line there and back, then waits on all of them and
// prints a holdEvent for each that ends, until SIGTERM.
func holdMain(targets []struct{ addr, want string }) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	conns := make([]net.Conn, len(targets))
	for i, t := range targets {
		c, err := net.DialTimeout("tcp", t.addr, requestTimeout)
		if err != nil {
			fmt.Printf("dial %s: %v\n", t.addr, err)
			return 1
		}
		_ = c.SetDeadline(time.Now().Add(requestTimeout))
		line := t.addr + "\n"
		if _, err := io.WriteString(c, line); err != nil {
			fmt.Printf("write %s: %v\n", t.addr, err)
			return 1
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != line {
			fmt.Printf("%s echoed %q, %v; want %q\n", t.addr, got, err, line)
			return 1
		}
		_ = c.SetDeadline(time.Time{})
		conns[i] = c
	}
	fmt.Printf("%s %d\n", holdReady, len(conns))
	var mu sync.Mutex
	for i, c := range conns {
		go func() {
			var b [1]byte
			_, err := c.Read(b[:])
			ev := holdEvent{Target: targets[i].addr, End: time.Now().UnixNano()}
			if errors.Is(err, syscall.ECONNABORTED) {
				ev.Aborted = true
			} else if err != nil {
				ev.Detail = err.Error()
			} else {
				ev.Detail = "unexpected data"
			}
			line, _ := json.Marshal(ev)
			mu.Lock()
			fmt.Println(string(line))
			mu.Unlock()
		}()
	}
	<-ctx.Done()
	fmt.Println(loopDone)
	return 0
}

// echoEnv, set to an address, makes the test binary an echo service there
// that never closes a connection first: what the hold client's sockets
// reach (the identity service closes idle connections after 5 s).
const echoEnv = "TETHER_E2E_ECHO"

func echoMain(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		return 1
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "echo:", err)
			return 1
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

// ask makes one HTTP request to addr on a new connection, with a deadline
// on the connect and on every read and write, and returns the trimmed body.
func ask(addr string) (string, error) {
	deadline := time.Now().Add(requestTimeout)
	c, err := (&net.Dialer{Deadline: deadline}).Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return "", err
	}
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", addr, resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}
