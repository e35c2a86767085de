package main

import (
	"strings"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

// TestProxyRefusesToListenBeyondLoopbackWithoutAuth: the command exits at
// once with one line naming the listener, before it touches the network.
func TestProxyRefusesToListenBeyondLoopbackWithoutAuth(t *testing.T) {
	rd := testutil.StartRedis(t)
	for _, args := range [][]string{
		{"--socks", "0.0.0.0:0"},
		{"--socks", ":0"},
		{"--http", "[::]:0"},
		{"--socks", "127.0.0.1:0", "--http", "0.0.0.0:0"},
	} {
		_, err := runTether(t, append([]string{"proxy", "--redis", rd.URL()}, args...)...)
		flag := args[len(args)-2]
		if err == nil || !strings.HasPrefix(err.Error(), flag+" ") || strings.Contains(err.Error(), "\n") ||
			!strings.Contains(err.Error(), "--auth-file") || !strings.Contains(err.Error(), "--allow-clients") {
			t.Errorf("tether proxy %s: want one line naming %s and the fix, got %v", strings.Join(args, " "), flag, err)
		}
	}
}
