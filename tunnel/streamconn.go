package tunnel

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// ErrSessionClosed means the tunnel is gone.
var ErrSessionClosed = errors.New("tunnel session closed")

// streamConn adapts a yamux stream to relay.HalfCloser: in yamux, Close sends a
// FIN and leaves reading open, which is exactly CloseWrite; our Close also
// unblocks local readers and writers at once.
type streamConn struct {
	*yamux.Stream
	closed atomic.Bool
	set    *streamSet // the session's, which forgets the stream on Close; may be nil
}

func (s *streamConn) CloseWrite() error { return s.Stream.Close() }

func (s *streamConn) Close() error {
	s.closed.Store(true)
	s.set.remove(s.Stream)
	err := s.Stream.Close()
	_ = s.Stream.SetDeadline(time.Unix(1, 0))
	return err
}
