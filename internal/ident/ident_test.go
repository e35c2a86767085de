package ident

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestValid(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"ps1", true},
		{"agent-198.18.1.11_a/b@c", true},
		{"~!#$%^&*()[]<>?|", true},
		{strings.Repeat("a", MaxLen), true},
		{"", false},
		{strings.Repeat("a", MaxLen+1), false},
		{"bad id", false},
		{"tab\tid", false},
		{"new\nline", false},
		{"nul\x00", false},
		{"del\x7f", false},
		{"ps:1", false},
		{"{ps1}", false},
		{"ps}", false},
		{"caf\u00e9", false}, // not ASCII
		{"bad\xff", false},   // not UTF-8 either
	} {
		err := Valid(tc.id)
		if tc.ok && err != nil {
			t.Errorf("Valid(%q) refused a good id: %v", tc.id, err)
		}
		if !tc.ok && err == nil {
			t.Errorf("Valid(%q) accepted a bad id", tc.id)
		}
	}
}

func TestErrorNamesTheIDClippedAndValidUTF8(t *testing.T) {
	err := Valid("bad id")
	if err == nil || !strings.Contains(err.Error(), `"bad id"`) {
		t.Fatalf("the error must name the id: %v", err)
	}
	long := strings.Repeat("\u00e9", 200) // 400 bytes, every cut lands near a rune edge
	err = Valid(long)
	if err == nil {
		t.Fatal("an overlong id was accepted")
	}
	msg := err.Error()
	if !utf8.ValidString(msg) {
		t.Fatalf("error is not valid UTF-8: %q", msg)
	}
	if len(msg) > 200 {
		t.Fatalf("error carries the whole id (%d bytes): %q", len(msg), msg)
	}
	if !strings.Contains(msg, "...") {
		t.Fatalf("a clipped id must say so: %q", msg)
	}
}
