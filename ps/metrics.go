package ps

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/tunnel"
)

// psMetrics are the PS's Prometheus metrics.
type psMetrics struct {
	tunnels          prometheus.Gauge
	handshakes       *prometheus.CounterVec
	endpoints        prometheus.Gauge
	streamsOpen      prometheus.Gauge
	streams          prometheus.Counter
	streamErrors     *prometheus.CounterVec
	bytesToAgent     prometheus.Counter
	bytesFromAgent   prometheus.Counter
	portsAllocated   prometheus.Gauge
	portsQuarantined prometheus.Gauge
	renewErrors      prometheus.Counter
	clientsRejected  prometheus.Counter
	// connsRefused counts client connections reset by a data-port limit
	// (reason port_limit or total_limit); idleClosed those closed by
	// --idle-timeout.
	connsRefused *prometheus.CounterVec
	idleClosed   prometheus.Counter
	// violations counts tunnels closed because the agent broke the
	// protocol after the handshake (reason agent_opened_stream, ...).
	violations *prometheus.CounterVec
	// silent counts tunnels closed because the agent sent nothing for
	// --tunnel-dead-after (tunnel/liveness.go).
	silent   prometheus.Counter
	insecure prometheus.Gauge
	// intent counts the intent check's results (ps/intent.go).
	intent *intentStats
	// reports counts lost-tunnel reports (ps/report.go).
	reports *reportStats
	// handshakeSeconds is how long admitted tunnels took from accept to
	// the session in service (TLS, Hello, authentication, port allocation,
	// the registry writes and the Welcome). Refusals are counted in
	// handshakes, not timed: a refused busy agent says nothing about how
	// long admission takes.
	handshakeSeconds prometheus.Histogram
}

// handshakeBuckets span a lone agent on loopback (~1 ms) to one exposing
// tens of thousands of endpoints against a slow registry (seconds).
var handshakeBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

func codeStrings(codes []tunnel.Code) []string {
	out := make([]string, len(codes))
	for i, c := range codes {
		out[i] = c.String()
	}
	return out
}

func newPSMetrics(reg prometheus.Registerer) (*psMetrics, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_ps_bytes_total", Help: "Bytes carried through tunnels, by direction.",
	}, []string{"direction"})
	m := &psMetrics{
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_tunnels", Help: "Agent tunnels currently established."}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_handshakes_total", Help: "Tunnel handshakes, by result (ok or the refusal code)."},
			[]string{"result"}),
		endpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_endpoints", Help: "Endpoints currently exposed through this PS."}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_streams_open", Help: "Client connections currently carried."}),
		streams: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_streams_total", Help: "Client connections accepted for a tunnel."}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_stream_errors_total", Help: "Client connections that could not be carried, by reason."},
			[]string{"reason"}),
		bytesToAgent:   bytes.WithLabelValues("to_agent"),
		bytesFromAgent: bytes.WithLabelValues("from_agent"),
		portsAllocated: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_ports_allocated", Help: "Ports of the range in use."}),
		portsQuarantined: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_ports_quarantined", Help: "Ports of the range waiting out their quarantine."}),
		renewErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_lease_renew_errors_total", Help: "Failed renewals of this PS's lease."}),
		clientsRejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_clients_rejected_total", Help: "Client connections closed because their source is outside --allow-clients."}),
		connsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_conns_refused_total", Help: "Client connections reset because a data-port limit was reached, by limit (port_limit, total_limit)."},
			[]string{"reason"}),
		idleClosed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_conns_idle_closed_total", Help: "Client connections closed after --idle-timeout without traffic either way."}),
		silent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_tunnels_silent_total", Help: "Tunnels closed because the agent sent nothing for --tunnel-dead-after (a silent death)."}),
		violations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_tunnel_violations_total", Help: "Tunnels closed because the agent broke the protocol after the handshake, by what it did."},
			[]string{"reason"}),
		insecure: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_insecure", Help: "1 when the PS runs with --insecure (agents need no credential), else 0."}),
		intent:  newIntentStats(),
		reports: newReportStats(),
		handshakeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_ps_handshake_duration_seconds",
			Help:    "Time from accepting an agent's tunnel connection to its session in service (admitted handshakes only).",
			Buckets: handshakeBuckets}),
	}
	// Every known result and reason is exported from the start, at zero, so
	// that dashboards and rate() see a series before the first event.
	for _, r := range append([]string{"ok", "closed", "tls_error", "source_busy"}, codeStrings(tunnel.RefusalCodes())...) {
		m.handshakes.WithLabelValues(r)
	}
	for _, r := range []string{"no_route", "no_session", "open_failed"} {
		m.streamErrors.WithLabelValues(r)
	}
	for _, c := range tunnel.StreamRefusalCodes() {
		m.streamErrors.WithLabelValues(c.String())
	}
	for _, r := range []string{"port_limit", "total_limit"} {
		m.connsRefused.WithLabelValues(r)
	}
	m.violations.WithLabelValues("agent_opened_stream")
	for _, c := range []prometheus.Collector{m.tunnels, m.handshakes, m.endpoints, m.streamsOpen, m.streams,
		m.streamErrors, bytes, m.portsAllocated, m.portsQuarantined, m.renewErrors, m.clientsRejected,
		m.connsRefused, m.idleClosed, m.violations, m.silent, m.insecure, m.intent.results, m.reports.results,
		m.handshakeSeconds} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
