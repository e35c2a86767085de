package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-net/tether/tunnel"
)

type metrics struct {
	tunnels      prometheus.Gauge
	reconnects   prometheus.Counter
	streams      prometheus.Counter
	streamsOpen  prometheus.Gauge
	streamErrors *prometheus.CounterVec
	bytesIn      prometheus.Counter
	bytesOut     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_agent_bytes_total", Help: "Bytes carried between tunnels and local targets, by direction."},
		[]string{"direction"})
	m := &metrics{
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_agent_tunnels", Help: "Tunnels currently up."}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_reconnects_total", Help: "Tunnel attempts that failed or tunnels that ended, each followed by a backoff."}),
		streams: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_agent_streams_total", Help: "Streams received from proxy servers."}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_agent_streams_open", Help: "Streams currently joined to a local target."}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_agent_stream_errors_total", Help: "Streams refused, by reason (not_exposed, dial_refused, dial_timeout, ...)."},
			[]string{"reason"}),
		bytesIn:  bytes.WithLabelValues("to_target"),
		bytesOut: bytes.WithLabelValues("from_target"),
	}
	// Every known reason is exported from the start, at zero.
	for _, c := range tunnel.StreamRefusalCodes() {
		m.streamErrors.WithLabelValues(c.String())
	}
	for _, c := range []prometheus.Collector{m.tunnels, m.reconnects, m.streams, m.streamsOpen, m.streamErrors, bytes} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
