package main

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/cliconfig"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
)

// quietFor is how long TestFewerPSThanTunnelsStaysQuiet watches: the
// issue's five minutes. It runs in parallel with the package's other tests.
const quietFor = 5 * time.Minute

// quietMaxLines bounds what both daemons may log about an agent that wants
// two tunnels where only one PS exists, over quietFor, at the default level.
const quietMaxLines = 10

// One PS and an agent with the default two tunnels: the agent says once that
// it runs with fewer tunnels and retries slowly, the PS refuses the second
// tunnel at debug level, and the one tunnel serves throughout.
func TestFewerPSThanTunnelsStaysQuiet(t *testing.T) {
	if testing.Short() {
		t.Skipf("watches the logs for %v; skipped with -short", quietFor)
	}
	t.Parallel()
	rd := testutil.StartRedis(t)
	listen := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	bin := tetherBin(t)
	ps := testutil.StartProc(t, "ps1", nil, bin, "ps", "--id", "ps1", "--listen", listen, "--advertise", "127.0.0.1",
		"--ports", tunneltest.FreeRange(t, 20), "--redis", rd.URL(),
		"--token-file", tunneltest.WriteTokens(t, tunneltest.Token+" * "+tunneltest.AgentRange+"\n"),
		"--agent-cidrs", tunneltest.AgentRange)
	testutil.WaitTCP(t, listen, 10*time.Second)
	srv := tunneltest.IdentityServer(t, "agent-a1")
	agent := testutil.StartProc(t, "agent a1", []string{cliconfig.TokenEnv + "=" + tunneltest.Token}, bin,
		"agent", "--server", listen, "--id", "a1", "--ip", "127.77.0.1", "--expose", "9100="+srv)
	reg := tunneltest.NewRegistry(t, rd.URL())
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	b := waitPS(t, reg, target, "ps1")["ps1"]
	askVia(t, b, "agent-a1")
	// From here on, everything either daemon logs is about the missing
	// second PS (nothing else happens).
	time.Sleep(2 * time.Second)
	psFrom, agentFrom := lines(ps.Output()), lines(agent.Output())
	deadline := time.Now().Add(quietFor)
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Second)
		askVia(t, b, "agent-a1")
	}
	psNew, agentNew := lines(ps.Output())[len(psFrom):], lines(agent.Output())[len(agentFrom):]
	t.Logf("FIGURE fewer_ps_than_tunnels_log_lines=%d over %v (ps %d, agent %d)", len(psNew)+len(agentNew), quietFor+2*time.Second, len(psNew), len(agentNew))
	if n := len(psNew) + len(agentNew); n > quietMaxLines {
		t.Errorf("%d log lines in %v, want at most %d:\nps:\n%s\nagent:\n%s", n, quietFor, quietMaxLines,
			strings.Join(psNew, "\n"), strings.Join(agentNew, "\n"))
	}
}

// lines splits a process's output into its complete lines.
func lines(out string) []string {
	out = out[:strings.LastIndex(out, "\n")+1]
	return strings.Split(strings.TrimSuffix(out, "\n"), "\n")
}
