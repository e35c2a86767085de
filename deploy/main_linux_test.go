package deploy

import (
	"os"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

// The package's tests run in a network namespace of their own when they
// can (root): the PS capability tests load the sk_lookup data plane, which
// attaches to its whole network namespace, and a test must never attach it
// to the machine's. The redis-server, the PS and the agents they start are
// children, so they share that namespace.
func TestMain(m *testing.M) { os.Exit(testutil.MainInPrivateNetns(m.Run)) }
