// Package daemon owns what every tether daemon shares at its edge: building
// the structured logger from flags and serving Prometheus metrics and a
// health endpoint over HTTP.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewLogger builds a slog logger writing to w. level is debug, info, warn or
// error; format is text or json.
func NewLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q: want text or json", format)
	}
}

// NewRegistry returns a Prometheus registry holding the Go runtime and
// process collectors, ready for a daemon's own metrics.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Probes are what a daemon tells its HTTP endpoint about itself.
type Probes struct {
	// Health checks serve /healthz: 200 "ok" while all return nil, else
	// 503 with their errors. They say whether the process works at all
	// (a restart may help), not whether it has finished starting.
	Health []func() error
	// Ready serves /readyz: 200 "ready" when it returns nil, else 503 with
	// its error, the reasons the daemon cannot do its job yet. nil means
	// ready as soon as the endpoint serves.
	Ready func() error
}

// ServeMetrics serves /metrics from g, /healthz and /readyz on addr until
// ctx ends. An empty addr disables it and returns nil at once. bound, when
// not nil, receives the bound address (useful with port 0). /healthz
// answers 200 "ok" while every check returns nil, else 503 with the
// checks' errors; /readyz is always ready (see Serve for a daemon that
// knows better).
func ServeMetrics(ctx context.Context, addr string, g prometheus.Gatherer, log *slog.Logger, bound func(net.Addr), checks ...func() error) error {
	return Serve(ctx, addr, g, log, bound, Probes{Health: checks})
}

// Serve serves /metrics from g, and /healthz and /readyz from probes, on
// addr until ctx ends. An empty addr disables it and returns nil at once.
// bound, when not nil, receives the bound address.
func Serve(ctx context.Context, addr string, g prometheus.Gatherer, log *slog.Logger, bound func(net.Addr), probes Probes) error {
	if addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { serveHealth(w, probes.Health) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { serveReady(w, probes.Ready) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	if bound != nil {
		bound(ln.Addr())
	}
	log.Info("serving metrics", "addr", ln.Addr().String(), "paths", "/metrics /healthz /readyz")
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		return nil
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("metrics server: %w", err)
	}
}

// serveHealth answers /healthz from the checks.
func serveHealth(w http.ResponseWriter, checks []func() error) {
	var errs []error
	for _, c := range checks {
		if err := c(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		_, _ = io.WriteString(w, "ok\n")
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = io.WriteString(w, "not ok: "+errors.Join(errs...).Error()+"\n")
}

// serveReady answers /readyz from ready.
func serveReady(w http.ResponseWriter, ready func() error) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if ready == nil {
		_, _ = io.WriteString(w, "ready\n")
		return
	}
	if err := ready(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, "not ready: "+err.Error()+"\n")
		return
	}
	_, _ = io.WriteString(w, "ready\n")
}
