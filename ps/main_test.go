package ps_test

import (
	"os"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

// The package's tests run in a network namespace of their own when they
// can (root): the sk_lookup data plane attaches to its whole namespace,
// and a test must never attach it to the machine's.
func TestMain(m *testing.M) { os.Exit(testutil.MainInPrivateNetns(m.Run)) }
