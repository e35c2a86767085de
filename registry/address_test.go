package registry

import (
	"context"
	"strings"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

func TestParseRedisAddressAcceptsTheDocumentedForms(t *testing.T) {
	for _, tc := range []struct {
		in, network, addr string
		db                int
		tls               bool
	}{
		{"127.0.0.1:6379", "tcp", "127.0.0.1:6379", 0, false},
		{"redis.internal:7000", "tcp", "redis.internal:7000", 0, false},
		{"[::1]:6380", "tcp", "[::1]:6380", 0, false},
		{"redis://127.0.0.1:6379/2", "tcp", "127.0.0.1:6379", 2, false},
		{"rediss://user:pw@10.0.0.5:6380/0", "tcp", "10.0.0.5:6380", 0, true},
		{"unix:///run/redis/redis.sock?db=3", "unix", "/run/redis/redis.sock", 3, false},
	} {
		opt, err := ParseRedisAddress(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if opt.Network != tc.network || opt.Addr != tc.addr || opt.DB != tc.db || (opt.TLSConfig != nil) != tc.tls {
			t.Errorf("%s: got network %s addr %s db %d tls %v", tc.in, opt.Network, opt.Addr, opt.DB, opt.TLSConfig != nil)
		}
	}
}

func TestParseRedisAddressSaysWhatItWantsInOneLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"localhost", "want host:port, redis://"},
		{"", "empty"},
		{"127.0.0.1:http", `port "http" is not a number`},
		{"127.0.0.1:0", `port "0" is not a number`},
		{"http://127.0.0.1:6379", `scheme "http" is not redis, rediss or unix`},
		{"redis://127.0.0.1:6379/notadb", "want host:port, redis://"},
	} {
		_, err := ParseRedisAddress(tc.in)
		if err == nil {
			t.Errorf("%q: accepted", tc.in)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: got %q, want one line containing %q", tc.in, err, tc.want)
		}
	}
}

func TestParseRedisAddressErrorHidesThePassword(t *testing.T) {
	_, err := ParseRedisAddress("redis://admin:hunter2@127.0.0.1:6379/notadb")
	if err == nil {
		t.Fatal("a bad database number was accepted")
	}
	if strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "xxxxx@127.0.0.1:6379") {
		t.Errorf("error must hide the password and keep the host: %v", err)
	}
}

// A registry given host:port talks to that Redis.
func TestRegistryWorksWithAHostPortAddress(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg, err := New(Config{URL: rd.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if err := reg.Ping(context.Background()); err != nil {
		t.Fatalf("ping via %s: %v", rd.Addr(), err)
	}
}
