package ident

import (
	"fmt"

	"github.com/tether-net/tether/internal/textclip"
)

// MaxLen is the longest id, in bytes.
const MaxLen = 128

// Valid checks an agent or PS id: 1 to MaxLen printable ASCII characters
// without blanks, braces or colons (the registry's key syntax). The error
// names the id, clipped, so a hostile id cannot flood a log.
func Valid(id string) error {
	if id == "" || len(id) > MaxLen {
		return fmt.Errorf("id %q: must be 1-%d characters", textclip.Short(id), MaxLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c >= 0x7f || c == '{' || c == '}' || c == ':' {
			return fmt.Errorf("id %q: character %q not allowed (printable ASCII without blanks, braces or colons)", textclip.Short(id), c)
		}
	}
	return nil
}
