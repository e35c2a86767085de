package ps

import (
	"fmt"
	"sync"

	"github.com/tether-net/tether/tunnel"
)

// usage is what one credential holds on this PS.
type usage struct{ tunnels, endpoints int }

// quotas bound what one credential may hold on this PS, so one token (or
// one certificate) cannot take every port of the range or every tunnel
// slot from the others.
type quotas struct {
	maxTunnels, maxEndpoints int

	mu   sync.Mutex
	used map[string]usage
}

func newQuotas(maxTunnels, maxEndpoints int) *quotas {
	return &quotas{maxTunnels: maxTunnels, maxEndpoints: maxEndpoints, used: map[string]usage{}}
}

// reserve takes one tunnel and up to want endpoints for key, and returns
// how many endpoints it granted. credit is what a session being superseded
// by this one holds: it is about to give that back, so it does not count.
func (q *quotas) reserve(key string, want int, credit usage) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	u := q.used[key]
	if u.tunnels-credit.tunnels >= q.maxTunnels {
		return 0, &tunnel.Refuse{Code: tunnel.CodeQuota, Reason: fmt.Sprintf("this credential already holds %d tunnels on this ps (--credential-tunnels)", u.tunnels)}
	}
	granted := min(want, max(0, q.maxEndpoints-(u.endpoints-credit.endpoints)))
	u.tunnels++
	u.endpoints += granted
	q.used[key] = u
	return granted, nil
}

// release gives back what a session (or a failed handshake) reserved.
func (q *quotas) release(key string, r usage) {
	q.mu.Lock()
	defer q.mu.Unlock()
	u := q.used[key]
	u.tunnels -= r.tunnels
	u.endpoints -= r.endpoints
	if u.tunnels <= 0 && u.endpoints <= 0 {
		delete(q.used, key)
		return
	}
	q.used[key] = u
}
