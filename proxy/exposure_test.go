package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

func TestListenersBeyondLoopbackNeedAuthOrAllowList(t *testing.T) {
	cases := []struct {
		name    string
		mod     func(*Config)
		wantErr string // a flag the error must name; "" = valid
	}{
		{"socks on 127.0.0.1", func(c *Config) { c.Socks = "127.0.0.1:1080" }, ""},
		{"socks on another loopback address", func(c *Config) { c.Socks = "127.1.2.3:1080" }, ""},
		{"socks on ::1", func(c *Config) { c.Socks = "[::1]:1080" }, ""},
		{"socks on IPv4-mapped loopback", func(c *Config) { c.Socks = "[::ffff:127.0.0.1]:1080" }, ""},
		{"socks on localhost", func(c *Config) { c.Socks = "localhost:1080" }, ""},
		{"socks on every address (empty host)", func(c *Config) { c.Socks = ":1080" }, "--socks"},
		{"socks on 0.0.0.0", func(c *Config) { c.Socks = "0.0.0.0:1080" }, "--socks"},
		{"socks on ::", func(c *Config) { c.Socks = "[::]:1080" }, "--socks"},
		{"socks on a public address", func(c *Config) { c.Socks = "198.18.0.1:1080" }, "--socks"},
		{"socks on a name", func(c *Config) { c.Socks = "proxy.example:1080" }, "--socks"},
		{"http on 0.0.0.0", func(c *Config) { c.HTTP = "0.0.0.0:3128" }, "--http"},
		{"http beyond loopback, socks on it", func(c *Config) { c.Socks, c.HTTP = "127.0.0.1:1080", "198.18.0.1:3128" }, "--http"},
		{"0.0.0.0 with --allow-clients", func(c *Config) { c.Socks, c.AllowClients = "0.0.0.0:1080", []string{"10.0.0.0/8"} }, ""},
		{"0.0.0.0 with --auth-file", func(c *Config) { c.HTTP, c.AuthFile = "0.0.0.0:3128", "/etc/tether/proxy-users" }, ""},
		{"a blank --allow-clients is none", func(c *Config) { c.Socks, c.AllowClients = "0.0.0.0:1080", []string{" "} }, "--socks"},
		{"a listener without a port", func(c *Config) { c.Socks = "127.0.0.1" }, "--socks"},
		{"--passthrough-cidrs without --passthrough", func(c *Config) { c.Socks, c.PassthroughCIDRs = "127.0.0.1:1080", []string{"127.77.0.0/16"} }, "--passthrough-cidrs"},
		{"a bad --passthrough-cidrs", func(c *Config) {
			c.Socks, c.Passthrough, c.PassthroughCIDRs = "127.0.0.1:1080", true, []string{"127.77.0.0/33"}
		}, "--passthrough-cidrs"},
	}
	for _, c := range cases {
		cfg := DefaultConfig()
		c.mod(&cfg)
		err := cfg.Validate()
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.wantErr != "" && err == nil:
			t.Errorf("%s: accepted, want an error naming %s", c.name, c.wantErr)
		case err != nil && (!strings.HasPrefix(err.Error(), c.wantErr) || strings.Contains(err.Error(), "\n")):
			t.Errorf("%s: want one line naming %s first, got %q", c.name, c.wantErr, err)
		case err != nil && strings.Contains(err.Error(), "beyond loopback") &&
			(!strings.Contains(err.Error(), "--auth-file") || !strings.Contains(err.Error(), "--allow-clients")):
			t.Errorf("%s: the error does not say how to fix it: %q", c.name, err)
		}
	}
}

// TestProxyOnEveryAddressStartsOnlyWithAllowClients starts the proxy on
// 0.0.0.0 against a real registry: refused without an allow list, serving
// (loopback clients, here) with one.
func TestProxyOnEveryAddressStartsOnlyWithAllowClients(t *testing.T) {
	rd := testutil.StartRedis(t)
	cfg := DefaultConfig()
	cfg.Redis, cfg.Socks = rd.URL(), "0.0.0.0:0"
	if p, err := New(cfg); err == nil {
		p.Close()
		t.Fatal("a proxy on 0.0.0.0 without --auth-file or --allow-clients was built")
	} else if !strings.Contains(err.Error(), "--socks 0.0.0.0:0") {
		t.Fatalf("the refusal does not name the listener: %v", err)
	}

	cfg.AllowClients = []string{"127.0.0.0/8"}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() { cancel(); <-done }()
	a, err := p.Addr(ctx, "socks")
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", a.(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		t.Fatal(err)
	}
	var sel [2]byte
	if _, err := io.ReadFull(c, sel[:]); err != nil || sel != [2]byte{5, 0} {
		t.Fatalf("a loopback client of the proxy on 0.0.0.0: %x %v", sel, err)
	}
}

// TestRunChecksTheBoundAddressToo: a proxy built around Validate (or a
// name that resolved off loopback) still refuses to serve.
func TestRunChecksTheBoundAddressToo(t *testing.T) {
	p, err := newWithLookup(Config{Socks: "0.0.0.0:0", DialTimeout: time.Second}, routeTable{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Run(ctx); err == nil || !strings.Contains(err.Error(), "--socks") || !strings.Contains(err.Error(), "--allow-clients") {
		t.Fatalf("Run on 0.0.0.0 without auth: %v", err)
	}
}
