package buildinfo

import (
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestResolve(t *testing.T) {
	vcs := &debug.BuildInfo{GoVersion: "go1.99", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
		{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123456789abcdef"}, {Key: "vcs.modified", Value: "true"},
	}}
	cases := []struct {
		name            string
		version, commit string
		bi              *debug.BuildInfo
		want            Info
	}{
		{"vcs data of a checkout build", "", "", vcs, Info{"dev", "0123456789abcdef-dirty", "go1.99"}},
		{"ldflags win over vcs data", "v1.2.3", "abc", vcs, Info{"v1.2.3", "abc", "go1.99"}},
		{"go install module@version", "", "", &debug.BuildInfo{GoVersion: "go1.99", Main: debug.Module{Version: "v0.4.0"}},
			Info{"v0.4.0", "unknown", "go1.99"}},
		{"nothing known", "", "", &debug.BuildInfo{GoVersion: "go1.99", Main: debug.Module{Version: "(devel)"}},
			Info{"dev", "unknown", "go1.99"}},
		{"clean tree", "", "", &debug.BuildInfo{GoVersion: "go1.99", Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "fedcba"}, {Key: "vcs.modified", Value: "false"}}}, Info{"dev", "fedcba", "go1.99"}},
	}
	for _, c := range cases {
		if got := resolve(c.version, c.commit, c.bi); got != c.want {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestCollectorExportsOneSeriesAtOne(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(Info{"v1", "abc", "go1.99"}))
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || mfs[0].GetName() != "tether_build_info" || len(mfs[0].GetMetric()) != 1 {
		t.Fatalf("gather: %v %v", mfs, err)
	}
	m := mfs[0].GetMetric()[0]
	labels := map[string]string{}
	for _, l := range m.GetLabel() {
		labels[l.GetName()] = l.GetValue()
	}
	if m.GetGauge().GetValue() != 1 || labels["version"] != "v1" || labels["commit"] != "abc" || labels["go_version"] != "go1.99" {
		t.Fatalf("tether_build_info %v = %v", labels, m.GetGauge().GetValue())
	}
	if s := (Info{"v1", "abc", "go1.99"}).String(); !strings.Contains(s, "v1") || !strings.Contains(s, "abc") || !strings.Contains(s, "go1.99") {
		t.Fatalf("String() = %q", s)
	}
}
