package quickstart

import (
	"os"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

// The package's tests run in a network namespace of their own when they
// can (root): a PS they start uses the sk_lookup data plane by default,
// which attaches to its whole network namespace, and a test must never
// attach it to the machine's.
func TestMain(m *testing.M) { os.Exit(testutil.MainInPrivateNetns(m.Run)) }
