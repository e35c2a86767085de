package benchutil

import (
	"context"

	"github.com/tether-net/tether/internal/redisproc"
)

// StartRedis starts redis-server on a free loopback port with a temporary
// data directory (no persistence), waits until it answers, and returns its
// URL and a stop function that also removes the directory.
func StartRedis() (url string, stop func(), err error) {
	srv, err := redisproc.Start(context.Background(), redisproc.Options{})
	if err != nil {
		return "", nil, err
	}
	return srv.URL(), func() { _ = srv.Close() }, nil
}
