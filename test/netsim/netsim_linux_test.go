package netsim

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

func TestMain(m *testing.M) {
	MaybeServeIdentity()
	os.Exit(m.Run())
}

// The topology itself, before any tether component runs: the VIP spreads
// over both PS nodes, and the router keeps the VPCs apart.
func TestTopologyIsolatesVPCsAndLoadBalancesTheVIP(t *testing.T) {
	testutil.RequirePrivileged(t)
	testutil.RequireBinary(t, "nft")
	testutil.RequireBinary(t, "curl")
	n, err := Build(NewPrefix())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	self, _ := os.Executable()
	serve := func(host, port string) {
		addr := n.Hosts[host].IP.String() + ":" + port
		if _, err := n.Start("http-"+host, host, StartOpts{Env: []string{IdentityEnvFor(addr, host)}}, self); err != nil {
			t.Fatal(err)
		}
		if err := n.WaitTCP(context.Background(), host, addr, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	serve("ps1", "7000")
	serve("ps2", "7000")
	serve("b1", "8080")
	serve("a2", "8080")
	// Central's server sits on the Redis port, the one VPC hosts would
	// most want to reach.
	serve("central", "6379")

	curl := func(from, url string) (string, error) {
		out, err := n.Run(from, "curl", "-sS", "--max-time", "2", url)
		return strings.TrimSpace(string(out)), err
	}
	// dropped requires that from's request to url times out: the router
	// drops it. A refused connection, or an answer, would mean the filter
	// let it through.
	dropped := func(what, from, url string) {
		t.Helper()
		out, err := curl(from, url)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != curlTimedOut {
			t.Fatalf("%s: want a timeout (curl exit %d, dropped by the router), got %v: %s", what, curlTimedOut, err, out)
		}
	}
	seen := map[string]bool{}
	for range 30 {
		out, err := curl("a1", "http://198.18.0.10:7000/")
		if err != nil {
			t.Fatalf("vpc-a host cannot reach the VIP's tunnel port: %v %s", err, out)
		}
		seen[out] = true
	}
	if !seen["ps1"] || !seen["ps2"] || len(seen) != 2 {
		t.Fatalf("the VIP must spread over ps1 and ps2, saw %v", seen)
	}
	dropped("vpc-a reached vpc-b", "a1", "http://198.18.2.11:8080/")
	dropped("vpc-a reached a PS directly, not through the VIP", "a1", "http://198.18.0.21:7000/")
	// The positive control first: central's server is up and the router
	// forwards to it from the PS subnet; only the source differs below.
	if out, err := curl("ps1", "http://198.18.3.10:6379/"); err != nil || out != "central" {
		t.Fatalf("the PS nodes reach central: %v %s", err, out)
	}
	dropped("vpc-b reached central", "b1", "http://198.18.3.10:6379/")
	dropped("vpc-a reached central", "a1", "http://198.18.3.10:6379/")
	if out, err := curl("a1", "http://198.18.1.12:8080/"); err != nil || out != "a2" {
		t.Fatalf("hosts of one VPC reach each other: %v %s", err, out)
	}
	if out, err := curl("central", "http://198.18.0.22:7000/"); err != nil || out != "ps2" {
		t.Fatalf("central reaches the PS nodes: %v %s", err, out)
	}
}

// curlTimedOut is curl's exit status when --max-time passes.
const curlTimedOut = 28
