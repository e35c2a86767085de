// Package buildinfo says which build of tether is running: its version, the
// commit it was built from and the Go toolchain. Every daemon exports it as
// tether_build_info and logs it at start; `tether version` prints it.
//
// The commit comes from the VCS data the go command embeds in a build made
// inside a git checkout (debug.ReadBuildInfo: vcs.revision, vcs.modified).
// Builds without it (-buildvcs=false, a source tarball, a container build
// without .git) can set it, and the version, with -ldflags:
//
//	-X github.com/tether-net/tether/internal/buildinfo.Version=v1.2.3
//	-X github.com/tether-net/tether/internal/buildinfo.Commit=0123abc
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// Version and Commit are set at link time with -ldflags -X (see the package
// comment). Empty means "not given": Get falls back to the embedded build
// information.
var (
	Version string
	Commit  string
)

// unknown stands for a value no source knows.
const unknown = "unknown"

// Info is one build's identity.
type Info struct {
	// Version is the release (from -ldflags, or the main module's version
	// when built with `go install module@version`), else "dev".
	Version string `json:"version"`
	// Commit is the git revision, with "-dirty" when the work tree had
	// changes; "unknown" when the build carries no VCS data.
	Commit string `json:"commit"`
	// GoVersion is the toolchain that built the binary.
	GoVersion string `json:"go_version"`
}

// Get returns the running binary's build identity.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return resolve(Version, Commit, bi)
}

// resolve merges the link-time values with the embedded build information:
// a value given with -ldflags wins, because it is what the release process
// stated on purpose.
func resolve(version, commit string, bi *debug.BuildInfo) Info {
	info := Info{Version: version, Commit: commit, GoVersion: runtime.Version()}
	if bi != nil {
		if bi.GoVersion != "" {
			info.GoVersion = bi.GoVersion
		}
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
		if info.Commit == "" {
			info.Commit = vcsCommit(bi.Settings)
		}
	}
	if info.Version == "" {
		info.Version = "dev"
	}
	if info.Commit == "" {
		info.Commit = unknown
	}
	return info
}

// vcsCommit reads vcs.revision and vcs.modified from the build settings.
func vcsCommit(settings []debug.BuildSetting) string {
	var rev string
	var modified bool
	for _, s := range settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if rev == "" {
		return ""
	}
	if modified && !strings.HasSuffix(rev, "-dirty") {
		rev += "-dirty"
	}
	return rev
}

// String is the one line `tether version` prints.
func (i Info) String() string {
	return fmt.Sprintf("tether %s (commit %s, %s)", i.Version, i.Commit, i.GoVersion)
}

// LogAttrs are the build's identity as slog key-value pairs, for the start
// line of every daemon.
func (i Info) LogAttrs() []any {
	return []any{"version", i.Version, "commit", i.Commit, "go_version", i.GoVersion}
}

// NewCollector returns the tether_build_info gauge: always 1, labelled
// with the build's version, commit and Go version, so that a dashboard can
// tell which build each daemon runs (and join it onto other series).
func NewCollector(i Info) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "tether_build_info",
		Help:        "Always 1; the labels say which build of tether is running.",
		ConstLabels: prometheus.Labels{"version": i.Version, "commit": i.Commit, "go_version": i.GoVersion},
	})
	g.Set(1)
	return g
}
