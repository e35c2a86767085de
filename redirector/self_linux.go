package redirector

import (
	"fmt"
	"syscall"

	"github.com/cilium/ebpf"
)

// MarkOwnSocket is a net.Dialer Control function (it runs after socket()
// and before connect()): it marks the socket as one of the redirector's own
// in the tether_self map, and the connect hooks never redirect a marked
// socket (redirect.c says why socket-local storage, not SO_MARK or a PID).
// The redirector dials Redis only through it, so a route whose target is
// the registry's own address cannot capture the redirector's Redis client,
// even when the redirector runs inside the cgroup it attaches to (for
// instance the root cgroup, named explicitly).
//
// A socket it cannot mark is not dialed (the error is returned): connecting
// it could send the redirector's Redis traffic to whoever registered that
// route.
func (in *Installation) MarkOwnSocket(network, address string, c syscall.RawConn) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil // only TCP sockets meet the connect hooks
	}
	var err error
	ctlErr := c.Control(func(fd uintptr) {
		// The map's key is the socket's fd (an int); user space writes
		// socket-local storage through it.
		err = in.objs.TetherSelf.Update(int32(fd), uint8(1), ebpf.UpdateAny)
	})
	if err == nil {
		err = ctlErr
	}
	if err != nil {
		return fmt.Errorf("mark the redirector's own %s socket to %s as exempt from redirection: %w", network, address, err)
	}
	return nil
}
