package execpath

import (
	"strings"
	"testing"
)

func TestLookFindsAProgramAndNamesAMissingOne(t *testing.T) {
	t.Setenv("PATH", "/nonexistent")
	// sh is in /usr/bin on every machine this project runs on; with PATH
	// useless, only the directory search can find it.
	if p, err := Look("sh"); err != nil || !strings.HasSuffix(p, "/sh") {
		t.Fatalf("Look(sh) with an empty PATH: %q, %v", p, err)
	}
	if _, err := Look("tether-no-such-program"); err == nil || !strings.Contains(err.Error(), "tether-no-such-program") {
		t.Fatalf("a missing program: %v, want an error naming it", err)
	}
}
