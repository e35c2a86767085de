package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestHTTPClientsGetTheDocumentedStatus sends each kind of HTTP proxy
// request and checks the exact status, that the proxy says why, that it
// closes the connection when the client is done (no hang), and that only a
// routed target reaches the upstream.
func TestHTTPClientsGetTheDocumentedStatus(t *testing.T) {
	const creds = "Proxy-Authorization: Basic b3BzOnMzY3JldA==\r\n" // ops:s3cret
	get := func(hostport string) string {
		return fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport)
	}
	connect := func(hostport string) string {
		return fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport)
	}
	users := map[string]string{"ops": "s3cret"}
	cases := []struct {
		name   string
		users  map[string]string
		in     string
		status int
	}{
		{"origin-form request", nil, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest},
		{"OPTIONS *", nil, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest},
		{"OPTIONS in origin-form", nil, "OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest},
		{"https:// URL without CONNECT", nil, "GET https://127.77.0.1:9100/ HTTP/1.1\r\nHost: 127.77.0.1:9100\r\n\r\n", http.StatusBadRequest},
		{"forward to a target without a route", nil, get(unroutedTarget.String()), http.StatusForbidden},
		{"CONNECT to a target without a route", nil, connect(unroutedTarget.String()), http.StatusForbidden},
		{"forward to a draining target", nil, get(drainingTarget.String()), http.StatusServiceUnavailable},
		{"CONNECT to a draining target", nil, connect(drainingTarget.String()), http.StatusServiceUnavailable},
		{"forward to a refusing backend", nil, get(refusedTarget.String()), http.StatusBadGateway},
		{"CONNECT to a refusing backend", nil, connect(refusedTarget.String()), http.StatusBadGateway},
		{"CONNECT to port 0", nil, connect("127.77.0.1:0"), http.StatusBadGateway},
		{"CONNECT to a name that does not resolve", nil, connect("nowhere.test:80"), http.StatusBadGateway},
		{"CONNECT to a name without a route", nil, connect("localhost:9100"), http.StatusForbidden},
		{"forward to a routed target", nil, get(routedTarget.String()), http.StatusOK},
		{"CONNECT to a routed target", nil, connect(routedTarget.String()), http.StatusOK},
		{"CONNECT to a routed IPv6 target", nil, connect(routedTarget6.String()), http.StatusOK},
		{"no credentials", users, get(routedTarget.String()), http.StatusProxyAuthRequired},
		{"wrong credentials", users, strings.Replace(connect(routedTarget.String()), "\r\n\r\n", "\r\nProxy-Authorization: Basic b3BzOndyb25n\r\n\r\n", 1), http.StatusProxyAuthRequired},
		{"right credentials", users, strings.Replace(connect(routedTarget.String()), "\r\n\r\n", "\r\n"+creds+"\r\n", 1), http.StatusOK},
		{"oversized header", nil, strings.Replace(get(routedTarget.String()), "\r\n\r\n", "\r\nX-Big: "+strings.Repeat("a", 64<<10)+"\r\n\r\n", 1), http.StatusRequestHeaderFieldsTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tp := newTestProxy(t, c.users)
			tp.startHTTP(t)
			run := runHTTP(t, tp, []byte(c.in))
			if run.err != nil {
				t.Fatalf("no answer and close within 5s: %v (got %q)", run.err, run.raw)
			}
			if run.resp == nil || run.resp.StatusCode != c.status {
				t.Fatalf("want status %d, got %q", c.status, run.raw)
			}
			wantContacts := int64(0)
			switch {
			case c.status == http.StatusOK:
				wantContacts = 1
				if !strings.HasSuffix(run.body, "upstream\n") {
					t.Errorf("a 200 without the upstream's bytes: %q", run.raw)
				}
			case c.status == http.StatusProxyAuthRequired:
				if got := run.resp.Header.Get("Proxy-Authenticate"); got != `Basic realm="tether"` {
					t.Errorf("407 with Proxy-Authenticate %q", got)
				}
				fallthrough
			case c.status != http.StatusRequestHeaderFieldsTooLarge:
				if !strings.HasPrefix(run.body, "tether proxy: ") {
					t.Errorf("a refusal that does not say it is the proxy's: %q", run.body)
				}
			}
			if run.contacts != wantContacts {
				t.Errorf("the upstream got %d connections, want %d", run.contacts, wantContacts)
			}
		})
	}
}

// TestHTTPClientThatHalfClosesAfterItsRequestIsServed: a client may shut
// its write side as soon as its request is sent (printf ... | nc -N) and
// still wait for the answer; net/http cancels such a request's context,
// which used to turn every answer into a 502.
func TestHTTPClientThatHalfClosesAfterItsRequestIsServed(t *testing.T) {
	tp := newTestProxy(t, nil)
	tp.startHTTP(t)
	for _, c := range []struct{ name, in, status string }{
		{"forward", fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n", routedTarget, routedTarget), "HTTP/1.1 200 OK\r\n"},
		{"CONNECT", fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", routedTarget, routedTarget), "HTTP/1.1 200 Connection Established\r\n"},
	} {
		before := tp.up.contacts.Load()
		conn, err := net.Dial("tcp", tp.http)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(conn, c.in); err != nil {
			t.Fatal(err)
		}
		_ = conn.(*net.TCPConn).CloseWrite()
		out, err := readUntilClosed(conn, 5*time.Second)
		conn.Close()
		if err != nil || !strings.HasPrefix(string(out), c.status) || !strings.HasSuffix(string(out), "upstream\n") {
			t.Errorf("%s, then a half-close: want %q and the upstream's bytes, got %q (%v)", c.name, c.status, out, err)
		}
		if n := tp.up.contacts.Load() - before; n != 1 {
			t.Errorf("%s: the upstream got %d connections, want 1", c.name, n)
		}
	}
}

// pipeListener hands the HTTP server in-memory connections, so that its
// timeouts run on synctest's fake clock.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// TestHTTPServerClosesSlowAndIdleClients: a client that stalls inside its
// header block is closed at readHeaderTimeout, and a keep-alive connection
// left idle after an answer at idleTimeout (it was held forever before).
func TestHTTPServerClosesSlowAndIdleClients(t *testing.T) {
	cases := []struct {
		name   string
		in     string
		answer bool // an answer comes before the wait
		want   time.Duration
	}{
		{"stalled header", "GET http://127.77.0.1:9100/ HTTP/1.1\r\nHost: 127.77", false, readHeaderTimeout},
		{"idle keep-alive", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", true, idleTimeout},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tp := newTestProxy(t, nil)
			synctest.Test(t, func(t *testing.T) {
				ln := newPipeListener()
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan error, 1)
				go func() { done <- tp.serveHTTP(ctx, ln) }()
				cli, srv := net.Pipe()
				ln.conns <- srv
				go func() { _, _ = io.WriteString(cli, c.in) }()
				_ = cli.SetReadDeadline(time.Now().Add(time.Hour))
				br := bufio.NewReader(cli)
				if c.answer {
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						t.Fatalf("no answer: %v", err)
					}
					_, _ = io.Copy(io.Discard, resp.Body)
				}
				start := time.Now()
				rest, err := io.ReadAll(br)
				if err != nil {
					t.Fatalf("the proxy held the connection for an hour: %v", err)
				}
				if got := time.Since(start); got != c.want || len(rest) != 0 {
					t.Errorf("closed after %v with %q, want a close after %v", got, rest, c.want)
				}
				cli.Close()
				cancel()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			})
		})
	}
}
