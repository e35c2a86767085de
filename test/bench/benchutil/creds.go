package benchutil

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/tether-net/tether/ps"
)

// Token is the credential the benchmarks' PS nodes accept and their agents
// present: benchmarks run with credentials, as production does.
const Token = "tether-bench-token"

// AgentRange is the loopback range benchmark agents expose endpoints in
// (127.77.x.y and 127.78.x.y); PS nodes name it in --agent-cidrs.
const AgentRange = "127.76.0.0/14"

var tokenFile = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "tether-bench-tokens")
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "tokens")
	return p, os.WriteFile(p, []byte(Token+" * "+AgentRange+"\n"), 0o600)
})

// PSCredentials makes cfg accept Token for any agent id, exposing endpoints
// in AgentRange.
func PSCredentials(cfg *ps.Config) error {
	p, err := tokenFile()
	if err != nil {
		return fmt.Errorf("write the benchmark token file: %w", err)
	}
	cfg.TokenFile = p
	cfg.AgentCIDRs = []string{AgentRange}
	return nil
}
