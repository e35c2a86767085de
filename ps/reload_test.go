package ps

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Reloading the token file swaps the tokens in force; a broken file is
// refused and leaves them as they were; tokens that do not come from a
// file cannot be reloaded.
func TestTokenReload(t *testing.T) {
	file := filepath.Join(t.TempDir(), "tokens")
	write := func(s string) {
		if err := os.WriteFile(file, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("old-token *\nkept-token a1\n")
	a, err := loadAuthorizer(&Config{TokenFile: file}, "TETHER_TEST_NO_SUCH_ENV")
	if err != nil {
		t.Fatal(err)
	}
	src := netip.MustParseAddr("198.18.1.11")
	accepts := func(token, id string) bool {
		_, err := a.authenticate(nil, id, token, src)
		return err == nil
	}
	if !accepts("old-token", "x") || accepts("new-token", "x") {
		t.Fatal("before the reload")
	}

	write("new-token *\nkept-token a1,a2\n")
	what, err := a.reload(file)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(what, "2 tokens (1 added, 1 removed") {
		t.Errorf("reload says %q", what)
	}
	if accepts("old-token", "x") || !accepts("new-token", "x") || !accepts("kept-token", "a2") {
		t.Fatal("after the reload: the old token must be refused, the new one and the widened one accepted")
	}

	write("just-a-token\n")
	if _, err := a.reload(file); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Fatalf("a broken token file: %v, want refused naming the line", err)
	}
	if !accepts("new-token", "x") {
		t.Fatal("a refused reload dropped the tokens in force")
	}

	if what, err := (&authorizer{}).reload(""); err != nil || !strings.Contains(what, "nothing") {
		t.Fatalf("reload without a token file: %q %v", what, err)
	}
}
