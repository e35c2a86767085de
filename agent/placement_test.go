package agent_test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/agent"
	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/ps"
)

// With fewer PS nodes than --tunnels the agent runs with what it has: it
// says so once, retries the slot it cannot place slowly, and counts those
// refusals apart from reconnects; the PS logs them at debug and counts
// them. This is the 5-minute story (one PS, --tunnels 2, --backoff-max
// 30s: at most 10 log lines about it) scaled down 15 times: 20 s with
// backoffs 15 times shorter.
func TestFewerPSThanTunnelsIsQuiet(t *testing.T) {
	run := 20 * time.Second
	if testing.Short() {
		run = 4 * time.Second
	}
	if s := os.Getenv("TETHER_PLACEMENT_RUN"); s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			run = d
		}
	}
	const scale = 15
	rd := testutil.StartRedis(t)
	psReg := prometheus.NewRegistry()
	node := tunneltest.StartPS(t, rd.URL(), "ps1", func(c *ps.Config) { c.Registerer = psReg })
	agentReg := prometheus.NewRegistry()
	a, alog, stop := tunneltest.StartAgent(t, "a1", "127.77.0.1", []string{node.Addr}, []string{"9100"}, func(c *agent.Config) {
		c.Tunnels = 2
		c.BackoffMin = 500 * time.Millisecond / scale
		c.BackoffMax = 30 * time.Second / scale
		c.StableAfter = 30 * time.Second / scale
		c.Registerer = agentReg
	})
	select {
	case <-a.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("agent never got its first tunnel")
	}
	psStart, agentStart := len(infoLines(node.Log.String())), len(infoLines(alog.String()))
	time.Sleep(run)
	stop()

	psLines := infoLines(node.Log.String())[psStart:]
	agentLines := infoLines(alog.String())[agentStart:]
	refusedPS := testutil.MetricValue(t, psReg, "tether_ps_handshakes_total", "result", "duplicate_ps")
	refusedAgent := testutil.MetricValue(t, agentReg, "tether_agent_placement_refusals_total")
	reconnects := testutil.MetricValue(t, agentReg, "tether_agent_reconnects_total")
	t.Logf("%v with one PS and --tunnels 2: ps %d info+ lines, agent %d; duplicate_ps refusals: ps counted %v, agent %v; reconnects %v",
		run, len(psLines), len(agentLines), refusedPS, refusedAgent, reconnects)
	for _, l := range append(psLines, agentLines...) {
		t.Logf("  %s", l)
	}
	if n := len(psLines) + len(agentLines); n > 10 {
		t.Errorf("%d log lines at info or above in %v, want at most 10", n, run)
	}
	if refusedPS == 0 || refusedAgent == 0 {
		t.Errorf("the slot was never retried (ps counted %v duplicate_ps refusals, agent %v): the test did not exercise it", refusedPS, refusedAgent)
	}
	if refusedAgent != refusedPS {
		t.Errorf("agent counted %v placement refusals, ps %v", refusedAgent, refusedPS)
	}
	if reconnects != 0 {
		t.Errorf("tether_agent_reconnects_total %v: placement refusals are not reconnects", reconnects)
	}
	// Said once, at warn: the agent runs with fewer tunnels than wanted.
	if n := strings.Count(alog.String(), "running with fewer tunnels than wanted"); n != 1 {
		t.Errorf("agent said %d times that it runs with fewer tunnels, want once", n)
	}
	// Slow: the scaled backoff ceiling is 2 s, at least half of it each
	// time once grown; a retry every second or two would be 6 refusals
	// per attempt, several attempts per scaled "minute".
	if attempts := refusedAgent / 6; attempts > float64(run/(time.Second/2)) {
		t.Errorf("%v attempts in %v: the slot is not retried slowly", attempts, run)
	}
}

// infoLines returns the lines of a text-handler log at INFO or above.
func infoLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if l != "" && !strings.Contains(l, "level=DEBUG") {
			out = append(out, l)
		}
	}
	return out
}
