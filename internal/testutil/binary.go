package testutil

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildTether builds the tether binary into dir and returns its path. It
// finds the module from the working directory, so any package's tests
// can call it (from TestMain, once per test binary; the build cache makes
// repeated builds cheap).
func BuildTether(dir string) (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == "/dev/null" {
		return "", fmt.Errorf("go env GOMOD: not inside the tether module")
	}
	bin := filepath.Join(dir, "tether")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/tether")
	cmd.Dir = filepath.Dir(mod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/tether: %w\n%s", err, out)
	}
	return bin, nil
}
