package grafana_test

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// catalogued is one row of the README's metrics catalogue.
type catalogued struct {
	kind    string // counter, gauge, histogram, summary
	labels  map[string]bool
	daemons string
}

// readCatalogue parses the table between <!-- metrics:begin --> and
// <!-- metrics:end --> of README.md: | `name` | type | `labels` | daemon | what |.
func readCatalogue(readme string) (map[string]catalogued, error) {
	begin := strings.Index(readme, "<!-- metrics:begin -->")
	end := strings.Index(readme, "<!-- metrics:end -->")
	if begin < 0 || end < begin {
		return nil, fmt.Errorf("README.md has no <!-- metrics:begin --> ... <!-- metrics:end --> table")
	}
	out := map[string]catalogued{}
	name := regexp.MustCompile("^`([a-z_:][a-z0-9_:]*)`$")
	for _, line := range strings.Split(readme[begin:end], "\n") {
		cells := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")
		if len(cells) < 4 {
			continue
		}
		m := name.FindStringSubmatch(strings.TrimSpace(cells[0]))
		if m == nil {
			continue // the header and its rule
		}
		row := catalogued{kind: strings.TrimSpace(cells[1]), labels: map[string]bool{}, daemons: strings.TrimSpace(cells[3])}
		for _, l := range strings.Split(cells[2], ",") {
			if l = strings.Trim(strings.TrimSpace(l), "`"); l != "" {
				row.labels[l] = true
			}
		}
		out[m[1]] = row
	}
	if len(out) < 20 {
		return nil, fmt.Errorf("found only %d rows in the README's metrics catalogue; the table moved", len(out))
	}
	return out, nil
}

// targetLabels are the labels Prometheus (or the Kubernetes service
// discovery of deploy/k8s) attaches to every scraped series.
var targetLabels = map[string]bool{"instance": true, "job": true, "namespace": true, "pod": true, "node": true, "container": true, "service": true}

// catalogueEntry resolves a metric name to its catalogue row, mapping the
// _bucket/_sum/_count series of a histogram (and _sum/_count of a summary)
// to their base name. part is the suffix ("" for the metric itself).
func catalogueEntry(cat map[string]catalogued, metric string) (base, part string, row catalogued, ok bool) {
	if row, ok := cat[metric]; ok {
		return metric, "", row, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		b, found := strings.CutSuffix(metric, suffix)
		if !found {
			continue
		}
		row, ok := cat[b]
		if ok && (row.kind == "histogram" || row.kind == "summary" && suffix != "_bucket") {
			return b, suffix, row, true
		}
	}
	return "", "", catalogued{}, false
}

// checkExpr parses one expression and checks it against the catalogue:
// every metric catalogued, every label one of its metrics has (or a target
// label), counters only under rate/irate/increase, gauges never under them,
// histogram buckets only rated and under histogram_quantile by le.
func checkExpr(cat map[string]catalogued, expr string) (metrics []string, errs []error) {
	q, err := parsePromQL(expr)
	if err != nil {
		return nil, []error{fmt.Errorf("does not parse: %w", err)}
	}
	if len(q.selectors) == 0 {
		errs = append(errs, fmt.Errorf("reads no metric"))
	}
	known := map[string]bool{}
	for k := range targetLabels {
		known[k] = true
	}
	usesQuantile := false
	for _, f := range q.functions {
		if f == "histogram_quantile" {
			usesQuantile = true
		}
	}
	for _, s := range q.selectors {
		base, part, row, ok := catalogueEntry(cat, s.metric)
		if !ok {
			errs = append(errs, fmt.Errorf("metric %s is not in the README's metrics catalogue", s.metric))
			continue
		}
		metrics = append(metrics, base)
		for l := range row.labels {
			known[l] = true
		}
		isCounter := row.kind == "counter" || part != ""
		switch {
		case isCounter && !counterFunctions[s.inRange]:
			errs = append(errs, fmt.Errorf("%s is a %s%s: read it through rate(), irate() or increase(), not %q", s.metric, row.kind, part, s.inRange))
		case !isCounter && counterFunctions[s.inRange]:
			errs = append(errs, fmt.Errorf("%s is a %s: %s() is for counters", s.metric, row.kind, s.inRange))
		}
		if part == "_bucket" {
			known["le"] = true
			if !usesQuantile {
				errs = append(errs, fmt.Errorf("%s is read without histogram_quantile()", s.metric))
			}
		}
	}
	for _, s := range q.selectors {
		for _, l := range s.labels {
			if !known[l] {
				errs = append(errs, fmt.Errorf("label %q of %s is not a label of the metrics it reads (README catalogue) nor a target label", l, s.metric))
			}
		}
	}
	for _, l := range q.grouping {
		if !known[l] {
			errs = append(errs, fmt.Errorf("groups by label %q, which none of its metrics has (README catalogue) and is not a target label", l))
		}
	}
	return metrics, errs
}

// dashboard is the part of Grafana's dashboard model the checks read.
type dashboard struct {
	Title         string  `json:"title"`
	UID           string  `json:"uid"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos *struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's panels
}

// checkDashboard runs every check over a dashboard's JSON and returns the
// metrics its queries read and the problems found.
func checkDashboard(cat map[string]catalogued, data []byte) (map[string]bool, []error) {
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, []error{fmt.Errorf("not a dashboard: %w", err)}
	}
	var errs []error
	if d.Title == "" || d.UID == "" || d.SchemaVersion == 0 {
		errs = append(errs, fmt.Errorf("dashboard needs a title, a uid and a schemaVersion"))
	}
	hasDatasourceVar := false
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDatasourceVar = true
		}
	}
	if !hasDatasourceVar {
		errs = append(errs, fmt.Errorf("no $datasource variable of type datasource (prometheus): the dashboard would be bound to one Grafana's data source uid"))
	}
	used := map[string]bool{}
	ids := map[int]string{}
	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if prev, dup := ids[p.ID]; dup || p.ID == 0 {
				errs = append(errs, fmt.Errorf("%s: id %d is missing or also used by %q", where, p.ID, prev))
			}
			ids[p.ID] = p.Title
			if p.GridPos == nil || p.GridPos.W == 0 || p.GridPos.H == 0 || p.GridPos.X+p.GridPos.W > 24 {
				errs = append(errs, fmt.Errorf("%s: gridPos missing or wider than the 24-column grid", where))
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				errs = append(errs, fmt.Errorf("%s: datasource must be ${datasource}", where))
			}
			if len(p.Targets) == 0 {
				errs = append(errs, fmt.Errorf("%s: no query", where))
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if refs[tg.RefID] || tg.RefID == "" {
					errs = append(errs, fmt.Errorf("%s: refId %q missing or repeated", where, tg.RefID))
				}
				refs[tg.RefID] = true
				metrics, exprErrs := checkExpr(cat, tg.Expr)
				for _, err := range exprErrs {
					errs = append(errs, fmt.Errorf("%s, query %s (%s): %w", where, tg.RefID, tg.Expr, err))
				}
				for _, m := range metrics {
					used[m] = true
				}
			}
		}
	}
	walk(d.Panels)
	return used, errs
}

func loadCatalogue(t *testing.T) map[string]catalogued {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	cat, err := readCatalogue(string(readme))
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

// TestDashboardQueriesReadCataloguedMetrics is the check of the dashboard
// that ships: every query parses and reads only catalogued metrics, and the
// dashboard covers what an operator of each daemon watches.
func TestDashboardQueriesReadCataloguedMetrics(t *testing.T) {
	cat := loadCatalogue(t)
	data, err := os.ReadFile("tether.json")
	if err != nil {
		t.Fatal(err)
	}
	used, errs := checkDashboard(cat, data)
	for _, err := range errs {
		t.Error(err)
	}
	for _, must := range []string{
		"tether_ps_tunnels", "tether_ps_handshakes_total", "tether_ps_streams_open", "tether_ps_stream_errors_total",
		"tether_ps_lost_tunnel_reports_total", "tether_ps_intent_total",
		"tether_ps_ports_allocated", "tether_ps_ports_capacity", "tether_ps_data_plane",
		"tether_agent_tunnels", "tether_agent_reconnects_total", "tether_agent_stream_errors_total", "tether_agent_lost_tunnel_reports_total",
		"tether_redirector_routes", "tether_redirector_map_full", "tether_redirector_bpf_events_total", "tether_redirector_passive_health_total",
		"tether_mirror_registry_reachable", "tether_mirror_registry_outages_total",
		"tether_proxy_requests_total",
	} {
		if !used[must] {
			t.Errorf("the dashboard does not show %s", must)
		}
	}
	var missing []string
	for m := range cat {
		if !used[m] {
			missing = append(missing, m)
		}
	}
	sort.Strings(missing)
	t.Logf("%d catalogued metrics on the dashboard; not shown: %v", len(used), missing)
}

// TestDashboardCheckFailsOnMistakes shows every rule can fail, on
// expressions and on a dashboard with one query broken.
func TestDashboardCheckFailsOnMistakes(t *testing.T) {
	cat := loadCatalogue(t)
	good := []string{
		`sum by (result) (rate(tether_ps_handshakes_total[$__rate_interval]))`,
		`count(tether_agent_tunnels < 2) or vector(0)`,
		`max by (instance) (tether_redirector_map_full{job="tether-redirector"})`,
		`sum(rate(tether_ps_bytes_total{direction="to_agent"}[5m])) / ignoring(direction) sum(tether_ps_streams_open)`,
		`topk(3, sum without (reason) (increase(tether_agent_stream_errors_total[1h])))`,
		`-sum(tether_ps_tunnels) offset 1h`,
		`max_over_time(tether_ps_tunnels[1h:5m])`,
	}
	for _, e := range good {
		if _, errs := checkExpr(cat, e); len(errs) > 0 {
			t.Errorf("a correct query fails: %s: %v", e, errs)
		}
	}
	bad := map[string]string{
		`sum(rate(tether_ps_handshake_total[5m]))`:                          "not in the README's metrics catalogue",
		`sum by (reason) (rate(tether_ps_handshakes_total[5m]))`:            `groups by label "reason"`,
		`sum(rate(tether_ps_handshakes_total{reslt="ok"}[5m]))`:             `label "reslt"`,
		`rate(tether_ps_tunnels[5m])`:                                       "rate() is for counters",
		`sum(tether_ps_streams_total)`:                                      "read it through rate()",
		`sum(rate(tether_ps_handshakes_total[5m])`:                          "does not parse",
		`sum(rat(tether_ps_handshakes_total[5m]))`:                          `unknown function "rat"`,
		`sum(rate(tether_ps_handshakes_total[5m])) by`:                      "does not parse",
		`{__name__="tether_ps_tunnels"}`:                                    "does not parse",
		`sum(rate(tether_ps_tunnels_bucket[5m]))`:                           "not in the README's metrics catalogue",
		`sum(rate(tether_ps_handshakes_total{result="ok}[5m]))`:             "does not parse",
		`histogram_quantile(0.9, rate(tether_ps_streams_total_bucket[5m]))`: "not in the README's metrics catalogue",
	}
	for e, want := range bad {
		_, errs := checkExpr(cat, e)
		found := false
		for _, err := range errs {
			if strings.Contains(err.Error(), want) {
				found = true
				t.Logf("%s: %v", e, err)
			}
		}
		if !found {
			t.Errorf("%s: want an error containing %q, got %v", e, want, errs)
		}
	}

	// A histogram row maps its _bucket series to the base name.
	withHist := map[string]catalogued{"tether_x_seconds": {kind: "histogram", labels: map[string]bool{"result": true}}}
	if _, errs := checkExpr(withHist, `histogram_quantile(0.99, sum by (le, result) (rate(tether_x_seconds_bucket[5m])))`); len(errs) > 0 {
		t.Errorf("a histogram quantile fails: %v", errs)
	}
	if _, errs := checkExpr(withHist, `sum(rate(tether_x_seconds_sum[5m])) / sum(rate(tether_x_seconds_count[5m]))`); len(errs) > 0 {
		t.Errorf("a histogram mean fails: %v", errs)
	}
	if _, errs := checkExpr(withHist, `sum(rate(tether_x_seconds_bucket[5m]))`); len(errs) == 0 {
		t.Error("buckets read without histogram_quantile pass")
	}

	// The shipped dashboard with one query broken fails the dashboard check.
	data, err := os.ReadFile("tether.json")
	if err != nil {
		t.Fatal(err)
	}
	broken := strings.Replace(string(data), "tether_ps_tunnels)", "tether_ps_tunnelz)", 1)
	if broken == string(data) {
		t.Fatal("the dashboard has no tether_ps_tunnels query to break")
	}
	if _, errs := checkDashboard(cat, []byte(broken)); len(errs) != 1 || !strings.Contains(errs[0].Error(), "tether_ps_tunnelz is not in the README's metrics catalogue") {
		t.Errorf("a dashboard with tether_ps_tunnelz: errors %v, want exactly that metric reported", errs)
	}
}
