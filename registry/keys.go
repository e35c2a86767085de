package registry

import (
	"fmt"
	"net/netip"

	"github.com/tether-net/tether/internal/ident"
)

// keys names the registry's Redis keys; the layout is documented in doc.go
// and the Lua scripts in publish.go build the same names from KEYS[1] (the
// hash tag p), so a change here must be made there too.
type keys struct{ p string }

// newKeys wraps prefix in braces: a hash tag, so every key lands in one
// Cluster slot and a script may touch several of them.
func newKeys(prefix string) keys { return keys{p: "{" + prefix + "}"} }

func (k keys) ps(id string) string           { return k.p + ":ps:" + id }
func (k keys) pses() string                  { return k.p + ":pses" }
func (k keys) route(t netip.AddrPort) string { return k.p + ":route:" + t.String() }
func (k keys) routeRaw(t string) string      { return k.p + ":route:" + t }
func (k keys) targets() string               { return k.p + ":targets" }
func (k keys) psroutes(id string) string     { return k.p + ":psroutes:" + id }
func (k keys) quarantine(id string) string   { return k.p + ":quarantine:" + id }
func (k keys) changes() string               { return k.p + ":changes" }
func (k keys) generation() string            { return k.p + ":generation" }

// validPSID checks a PS id before it becomes part of a key name. The rule
// is the one the tunnel handshake applies, so an id the PS accepted from its
// configuration is never refused here, and no id can reach into another
// key's name (colons) or hash tag (braces).
func validPSID(id string) error {
	if err := ident.Valid(id); err != nil {
		return fmt.Errorf("invalid ps id: %w", err)
	}
	return nil
}
