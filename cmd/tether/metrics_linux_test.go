package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/internal/tunneltest"
	"github.com/tether-net/tether/registry"
)

// documentedMetric is one row of the README's metrics catalogue.
type documentedMetric struct {
	name    string
	typ     string   // counter, gauge, histogram
	labels  []string // sorted
	daemons []string
}

// readCatalogue parses the table between the metrics markers of README.md.
func readCatalogue(t *testing.T) []documentedMetric {
	t.Helper()
	_, here, _, _ := runtime.Caller(0)
	f, err := os.Open(filepath.Join(filepath.Dir(here), "..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []documentedMetric
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "<!-- metrics:begin -->":
			in = true
			continue
		case line == "<!-- metrics:end -->":
			in = false
		}
		if !in || !strings.HasPrefix(line, "| `") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if len(cells) != 5 {
			t.Fatalf("README metrics row with %d cells, want 5: %s", len(cells), line)
		}
		m := documentedMetric{name: strings.Trim(strings.TrimSpace(cells[0]), "`"), typ: strings.TrimSpace(cells[1])}
		for _, l := range strings.Split(cells[2], ",") {
			if l = strings.Trim(strings.TrimSpace(l), "`"); l != "" {
				m.labels = append(m.labels, l)
			}
		}
		slices.Sort(m.labels)
		for _, d := range strings.Split(cells[3], ",") {
			m.daemons = append(m.daemons, strings.TrimSpace(d))
		}
		out = append(out, m)
	}
	if len(out) < 20 {
		t.Fatalf("found %d rows in the README's metrics catalogue; the markers or the table moved", len(out))
	}
	return out
}

// scrape fetches addr's /metrics and parses it; it also checks /healthz.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "ok" {
		t.Fatalf("/healthz on %s: %d %q, want 200 ok", addr, resp.StatusCode, body)
	}
	return testutil.ScrapeFamilies(t, addr)
}

// checkCatalogue compares what a daemon exports with the README's rows for
// it: every row exists with its type and label names, every tether_ metric
// exported has a row.
func checkCatalogue(t *testing.T, daemon string, mfs map[string]*dto.MetricFamily, cat []documentedMetric) {
	t.Helper()
	documented := map[string]bool{}
	for _, m := range cat {
		if !slices.Contains(m.daemons, daemon) {
			continue
		}
		documented[m.name] = true
		mf, ok := mfs[m.name]
		if !ok {
			t.Errorf("%s: README documents %s, but /metrics has no such metric", daemon, m.name)
			continue
		}
		if got := strings.ToLower(mf.GetType().String()); got != m.typ {
			t.Errorf("%s: %s is a %s, README says %s", daemon, m.name, got, m.typ)
		}
		for _, s := range mf.GetMetric() {
			var names []string
			for _, lp := range s.GetLabel() {
				names = append(names, lp.GetName())
			}
			slices.Sort(names)
			if !slices.Equal(names, m.labels) {
				t.Errorf("%s: %s has labels %v, README says %v", daemon, m.name, names, m.labels)
				break
			}
		}
	}
	for name := range mfs {
		if strings.HasPrefix(name, "tether_") && !documented[name] {
			t.Errorf("%s exports %s, which the README's metrics catalogue does not list for it", daemon, name)
		}
	}
	for _, std := range []string{"go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := mfs[std]; !ok {
			t.Errorf("%s: /metrics lacks %s (the Go and process collectors)", daemon, std)
		}
	}
}

func freeAddr(t *testing.T) string { return fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)) }

// Every daemon serves /metrics and /healthz, and exports exactly the
// metrics the README's catalogue lists, with their types and labels.
func TestEveryDaemonExportsTheDocumentedMetrics(t *testing.T) {
	testutil.RequirePrivileged(t) // the redirector loads BPF
	cat := readCatalogue(t)
	rd := testutil.StartRedis(t)
	reg, err := registry.New(registry.Config{URL: rd.URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()

	metrics := map[string]string{"ps": freeAddr(t), "agent": freeAddr(t), "proxy": freeAddr(t), "redirector": freeAddr(t)}
	ps1 := startPSProc(t, rd.URL(), "ps1", "--metrics", metrics["ps"], "--agent-cidrs", "127.77.0.0/16")
	srv := tunneltest.IdentityServer(t, "agent-a1")
	startProc(t, "agent a1", "agent", "--server", ps1.listen, "--tunnels", "1", "--id", "a1",
		"--ip", "127.77.0.1", "--expose", "9100="+srv, "--metrics", metrics["agent"])
	target := netip.MustParseAddrPort("127.77.0.1:9100")
	backend := waitPS(t, reg, target, "ps1")["ps1"]
	askVia(t, backend, "agent-a1") // a stream through PS and agent

	socks := freeAddr(t)
	startProc(t, "proxy", "proxy", "--redis", rd.URL(), "--socks", socks, "--metrics", metrics["proxy"])
	testutil.WaitTCP(t, socks, 10*time.Second)
	socksRequestWithoutRoute(t, socks)

	cg := testutil.NewCgroup(t)
	pinDir := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tm"))
	t.Cleanup(func() {
		if out, err := runTether(t, "redirector", "uninstall", "--pin-dir", pinDir); err != nil {
			t.Errorf("redirector uninstall: %v\n%s", err, out)
		}
	})
	startProc(t, "redirector", "redirector", "--redis", rd.URL(), "--cgroup", cg.Path, "--pin-dir", pinDir,
		"--metrics", metrics["redirector"])

	for daemon, addr := range metrics {
		testutil.WaitTCP(t, addr, 15*time.Second)
		var mfs map[string]*dto.MetricFamily
		// The mirror's gauges appear with its first load; wait for that
		// by what the daemon says, not by a sleep.
		testutil.Eventually(t, 15*time.Second, daemon+" reports its first sync", func() error {
			mfs = scrape(t, addr)
			if daemon == "redirector" || daemon == "proxy" {
				if mf, ok := mfs["tether_mirror_full_loads_total"]; !ok || mf.GetMetric()[0].GetCounter().GetValue() < 1 {
					return fmt.Errorf("no full load yet")
				}
			}
			return nil
		})
		checkCatalogue(t, daemon, mfs, cat)
	}
}

// socksRequestWithoutRoute makes the proxy count one SOCKS5 request.
func socksRequestWithoutRoute(t *testing.T, socks string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", socks, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	// Greeting (no auth), then CONNECT 127.77.9.9:9 which has no route.
	req := []byte{5, 1, 0, 5, 1, 0, 1, 127, 77, 9, 9, 0, 9}
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 12)
	if _, err := io.ReadFull(c, reply); err != nil {
		t.Fatalf("SOCKS5 reply: %v", err)
	}
	if reply[0] != 5 || reply[2] != 5 || reply[3] == 0 {
		t.Fatalf("SOCKS5 reply %v: want a refusal of a target without a route", reply)
	}
}
