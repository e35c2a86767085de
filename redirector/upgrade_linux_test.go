package redirector

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tether-net/tether/bpf"
	"github.com/tether-net/tether/internal/testutil"
)

// An installation by the version before the PS deadlines has neither
// tether_ps_deadline nor tether_redirector_state; the route map's layout
// is unchanged. Status reads it as it is, and an in-place upgrade adds
// the two maps next to the reused ones.
func TestAnInstallWithoutTheDeadlineMapsIsUpgradedInPlace(t *testing.T) {
	cg := testutil.NewCgroup(t)
	pin := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tt"))
	t.Cleanup(func() { _ = Uninstall(pin) })
	in, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	in.Close()
	for _, m := range []string{bpf.RedirectMapTetherPsDeadline, bpf.RedirectMapTetherRedirectorState} {
		if err := os.Remove(filepath.Join(pin, m)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := ReadStatus(pin)
	if err != nil || st.Writes != nil || st.Deadlines.PSAddresses != 0 {
		t.Fatalf("status of an older installation: %+v %v", st, err)
	}
	in2, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatalf("in-place upgrade: %v", err)
	}
	defer in2.Close()
	if !in2.Updated {
		t.Fatal("the upgrade did not reuse the pins")
	}
	for _, m := range []string{bpf.RedirectMapTetherPsDeadline, bpf.RedirectMapTetherRedirectorState} {
		if _, err := os.Stat(filepath.Join(pin, m)); err != nil {
			t.Fatalf("%s not pinned by the upgrade: %v", m, err)
		}
	}
}
