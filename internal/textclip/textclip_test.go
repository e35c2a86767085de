package textclip

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		n    int
		want string
	}{
		{"short ascii is kept", "ps-1", 64, "ps-1"},
		{"exact length is kept", "abcd", 4, "abcd"},
		{"long ascii is cut at n", "abcdef", 4, "abcd"},
		{"zero length gives nothing", "abc", 0, ""},
		{"negative length gives nothing", "abc", -1, ""},
		{"a rune across the cut is dropped whole", "ab\u00e9", 3, "ab"},    // é is 2 bytes
		{"a 4-byte rune across the cut is dropped", "a\U0001F600", 4, "a"}, // 😀 is 4 bytes
		{"a rune that fits is kept", "a\U0001F600", 5, "a\U0001F600"},
		{"invalid bytes become ?", "a\xffb", 10, "a?b"},
		{"a run of invalid bytes becomes one ?", "a\xff\xfe\xfdb", 10, "a?b"},
		{"a truncated rune in the input becomes ?", "ab\xc3", 10, "ab?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Clip(tc.in, tc.n)
			if got != tc.want {
				t.Errorf("Clip(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
			}
			if !utf8.ValidString(got) {
				t.Errorf("Clip(%q, %d) = %q is not valid UTF-8", tc.in, tc.n, got)
			}
			if tc.n >= 0 && len(got) > tc.n {
				t.Errorf("Clip(%q, %d) = %q is longer than %d bytes", tc.in, tc.n, got, tc.n)
			}
		})
	}
}

func TestShort(t *testing.T) {
	long := strings.Repeat("x", 63) + "\u00e9" + "tail" // é straddles byte 64
	for _, tc := range []struct {
		name string
		in   string
		want string
	}{
		{"short text is whole, no ellipsis", "198.18.1.11:8080", "198.18.1.11:8080"},
		{"exactly 64 bytes is whole", strings.Repeat("a", 64), strings.Repeat("a", 64)},
		{"65 bytes is cut with an ellipsis", strings.Repeat("a", 65), strings.Repeat("a", 64) + "..."},
		{"the cut never splits a rune", long, strings.Repeat("x", 63) + "..."},
		{"invalid bytes in short text become ?", "id\xff", "id?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Short(tc.in)
			if got != tc.want {
				t.Errorf("Short(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if !utf8.ValidString(got) {
				t.Errorf("Short(%q) = %q is not valid UTF-8", tc.in, got)
			}
		})
	}
}
