package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/tunnel"
)

type metrics struct {
	tunnels    prometheus.Gauge
	reconnects prometheus.Counter
	// placementRefusals counts handshakes a PS refused because the agent
	// already holds a tunnel on it (fewer PS nodes than --tunnels); they
	// are not reconnects. silent counts tunnels closed because the PS sent
	// nothing for --tunnel-dead-after.
	placementRefusals prometheus.Counter
	silent            prometheus.Counter
	streams           prometheus.Counter
	streamsOpen       prometheus.Gauge
	streamErrors      *prometheus.CounterVec
	bytesIn           prometheus.Counter
	bytesOut          prometheus.Counter
	// lostReports counts lost-tunnel reports sent through surviving
	// tunnels, by result (agent/report.go).
	lostReports *prometheus.CounterVec
	// dialSeconds is how long dials of local targets took, failed ones
	// included (a refused dial is fast, a timed-out one takes
	// --dial-timeout): the local leg of every stream's setup.
	dialSeconds prometheus.Histogram
	// poolIdle is how many data connections wait for a client, over all
	// tunnels; poolDials counts dials of data connections by result
	// (agent/pool.go).
	poolIdle  prometheus.Gauge
	poolDials *prometheus.CounterVec
}

// Results of a data connection dial, the result label of
// tether_agent_pool_dials_total: ok (the PS took it into the pool), failed
// (no connection, TLS or opening failed), refused (the PS answered
// pool_refused).
var poolDialResults = []string{"ok", "failed", "refused"}

// dialBuckets span a local service on loopback (~50 µs) to --dial-timeout.
var dialBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_agent_bytes_total", Help: "Bytes carried between tunnels and local targets, by direction."},
		[]string{"direction"})
	m := &metrics{
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_agent_tunnels", Help: "Tunnels currently up."}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_reconnects_total", Help: "Real reconnects: tunnels that were up and ended, and failed attempts (dial, handshake) of a slot that wanted a tunnel; not placement refusals."}),
		placementRefusals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_placement_refusals_total", Help: "Handshakes refused with duplicate_ps: the PS reached already holds a tunnel of this agent (fewer PS nodes than --tunnels)."}),
		silent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_tunnels_silent_total", Help: "Tunnels closed because the PS sent nothing for --tunnel-dead-after (a silent death)."}),
		streams: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_streams_total", Help: "Client connections received from proxy servers, on tunnel streams and pooled data connections."}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_agent_streams_open", Help: "Streams currently joined to a local target."}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_agent_stream_errors_total", Help: "Streams refused, by reason (not_exposed, dial_refused, dial_timeout, ...)."},
			[]string{"reason"}),
		lostReports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_agent_lost_tunnel_reports_total", Help: "Lost-tunnel reports, one per surviving tunnel, by result: ok (acked), refused (acked with a refusal), error (no ack in time), no_control (that tunnel's PS has no control channel), no_tunnel (no other tunnel to report through)."},
			[]string{"result"}),
		bytesIn:  bytes.WithLabelValues("to_target"),
		bytesOut: bytes.WithLabelValues("from_target"),
		dialSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_agent_stream_dial_duration_seconds",
			Help:    "Time the agent took to dial a local target for a stream, failed dials included.",
			Buckets: dialBuckets}),
		poolIdle: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_agent_pool_idle", Help: "Data connections of the pooled data path waiting for a client, all tunnels."}),
		poolDials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_agent_pool_dials_total", Help: "Dials of data connections to PS pool listeners, by result: ok, failed (connect, TLS or opening), refused (the PS answered pool_refused)."},
			[]string{"result"}),
	}
	// Every known reason is exported from the start, at zero.
	for _, c := range tunnel.StreamRefusalCodes() {
		m.streamErrors.WithLabelValues(c.String())
	}
	for _, r := range reportResults {
		m.lostReports.WithLabelValues(r)
	}
	for _, r := range poolDialResults {
		m.poolDials.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.tunnels, m.reconnects, m.placementRefusals, m.silent, m.streams, m.streamsOpen, m.streamErrors, m.lostReports, bytes, m.dialSeconds, m.poolIdle, m.poolDials} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
