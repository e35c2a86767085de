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
	// dataPlane is 1 for the data plane in use (label plane: sk_lookup or
	// listeners); portsCapacity is how many (address, port) pairs the
	// advertise addresses and the port range hold.
	dataPlane     *prometheus.GaugeVec
	portsCapacity prometheus.Gauge
	// dataPath counts client connections by the path that carried them
	// (mux: a tunnel stream; pool: a pooled data connection); poolConns
	// counts data connections' openings by result (pool.go).
	dataPath  *prometheus.CounterVec
	poolConns *prometheus.CounterVec
	// poolStale counts pooled data connections found dead when a client
	// connection was paired with them (retried on the next).
	poolStale prometheus.Counter
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
		dataPlane: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tether_ps_data_plane", Help: "1 for the data plane this PS accepts client connections with (plane: sk_lookup or listeners), 0 for the other."},
			[]string{"plane"}),
		portsCapacity: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_ps_ports_capacity", Help: "(address, port) pairs this PS can hand out: advertise addresses times the port range."}),
		dataPath: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_data_path_total", Help: "Client connections carried, by path: mux (a stream of the tunnel) or pool (a pooled data connection)."},
			[]string{"path"}),
		poolConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_ps_pool_conns_total", Help: "Data connections agents opened to the pool listener, by result: accepted (idle in a session's pool) or refused."},
			[]string{"result"}),
		poolStale: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_ps_pool_stale_total", Help: "Pooled data connections found dead when paired with a client connection (the next one, or the tunnel, carried the client)."}),
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
	for _, path := range []string{DataPathMux, DataPathPool} {
		m.dataPath.WithLabelValues(path)
	}
	for _, r := range []string{poolAccepted, poolRefused} {
		m.poolConns.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.tunnels, m.handshakes, m.endpoints, m.streamsOpen, m.streams,
		m.streamErrors, bytes, m.portsAllocated, m.portsQuarantined, m.renewErrors, m.clientsRejected,
		m.connsRefused, m.idleClosed, m.violations, m.silent, m.insecure, m.intent.results, m.reports.results,
		m.handshakeSeconds, m.dataPlane, m.portsCapacity, m.dataPath, m.poolConns, m.poolStale} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// steeringCounters are what the sk_lookup plane counts (skplane_linux.go).
type steeringCounters interface {
	counters() (steered, assignFailed uint64, err error)
	unclaimedResets() uint64
}

// registerSteering exports the sk_lookup plane's counters; with the
// listener plane they stay at zero, so a dashboard's series exist either
// way. The kernel's counters are read at scrape time.
func registerSteering(reg prometheus.Registerer, plane dataPlane) error {
	sk, _ := plane.(steeringCounters)
	kernel := func(pick func(steered, failed uint64) uint64) func() float64 {
		return func() float64 {
			if sk == nil {
				return 0
			}
			s, f, err := sk.counters()
			if err != nil {
				return 0
			}
			return float64(pick(s, f))
		}
	}
	for _, c := range []prometheus.Collector{
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tether_ps_steered_total", Help: "Client connections the sk_lookup program handed to the PS's socket (0 with the listeners plane)."},
			kernel(func(s, _ uint64) uint64 { return s })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tether_ps_steer_failed_total", Help: "Connections to an open pair the sk_lookup program could not hand to the socket (should stay 0)."},
			kernel(func(_, f uint64) uint64 { return f })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "tether_ps_steer_unclaimed_total", Help: "Connections reset because their pair was released between the SYN and the accept (sk_lookup plane)."},
			func() float64 {
				if sk == nil {
					return 0
				}
				return float64(sk.unclaimedResets())
			}),
	} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// registerPoolIdle exports how many idle data connections the PS holds,
// all sessions together, read at scrape time.
func registerPoolIdle(reg prometheus.Registerer, pools *poolSet) error {
	return reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tether_ps_pool_idle", Help: "Idle pooled data connections agents keep open to this PS, all sessions together."},
		func() float64 { return float64(pools.idle.Load()) }))
}
