package redirector

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tether-net/tether/internal/testutil"
)

func TestInstallLoadsAttachesAndUninstalls(t *testing.T) {
	cg := testutil.NewCgroup(t)
	pin := filepath.Join("/sys/fs/bpf", testutil.UniqueName("tt"))
	t.Cleanup(func() { _ = Uninstall(pin) })
	in, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	in.Close()
	st, err := ReadStatus(pin)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Links) != 6 || st.Capacity != 1000 { // connect4/6, getpeername4/6, the intent and passive health sockops
		t.Fatalf("status: %+v", st)
	}
	// A second install swaps programs on the pinned links.
	in2, err := Install(pin, cg.Path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if !in2.Updated {
		t.Fatal("second install did not reuse the pins")
	}
	in2.Close()
	if err := Uninstall(pin); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin dir left behind: %v", err)
	}
}
