package textclip

import (
	"strings"
	"unicode/utf8"
)

// ShortLen is how many bytes Short keeps.
const ShortLen = 64

// Clip returns s as valid UTF-8 of at most n bytes: every run of invalid
// bytes becomes '?', and the cut falls on a rune boundary, so a multi-byte
// rune is dropped whole rather than split.
func Clip(s string, n int) string {
	s = strings.ToValidUTF8(s, "?")
	if n <= 0 {
		return ""
	}
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Short clips s to ShortLen bytes and appends "..." when anything was cut,
// so a reader can tell a clipped value from a whole one.
func Short(s string) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) <= ShortLen {
		return s
	}
	return Clip(s, ShortLen) + "..."
}
