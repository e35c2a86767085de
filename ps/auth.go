package ps

import (
	"bufio"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/tunnel"
)

// tokenRule is one line of a token file: a token and, optionally, the CIDRs
// its holder may expose endpoints in.
type tokenRule struct {
	token []byte
	cidrs cidr.List // empty = any address
}

// authorizer checks agents' tokens. With no rule at all it accepts every
// agent (the PS warns about that at start).
type authorizer struct{ rules []tokenRule }

// loadTokens reads a token file, or the single token in env when path is
// empty. Format: one token per line, optionally followed by white space and
// a comma-separated list of CIDRs; blank lines and lines starting with #
// are skipped.
func loadTokens(path, env string) (*authorizer, error) {
	if path == "" {
		tok := strings.TrimSpace(os.Getenv(env))
		if tok == "" {
			return &authorizer{}, nil
		}
		return &authorizer{rules: []tokenRule{{token: []byte(tok)}}}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read token file: %w", err)
	}
	defer f.Close()
	return parseTokens(bufio.NewScanner(f), path)
}

func parseTokens(sc *bufio.Scanner, name string) (*authorizer, error) {
	a := &authorizer{}
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		fields := strings.Fields(text)
		if len(fields) > 2 {
			return nil, fmt.Errorf("token file %s line %d: want a token and an optional CIDR list (comma-separated, no blanks)", name, line)
		}
		if len(fields[0]) > tunnel.MaxTokenLen {
			return nil, fmt.Errorf("token file %s line %d: token longer than %d bytes", name, line, tunnel.MaxTokenLen)
		}
		r := tokenRule{token: []byte(fields[0])}
		if len(fields) == 2 {
			for _, c := range strings.Split(fields[1], ",") {
				if c == "" {
					continue
				}
				p, err := cidr.ParseOne(c)
				if err != nil {
					return nil, fmt.Errorf("token file %s line %d: %w", name, line, err)
				}
				r.cidrs = append(r.cidrs, p)
			}
		}
		a.rules = append(a.rules, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read token file %s: %w", name, err)
	}
	if len(a.rules) == 0 {
		return nil, fmt.Errorf("token file %s holds no token", name)
	}
	return a, nil
}

// open reports whether the authorizer accepts any token.
func (a *authorizer) open() bool { return len(a.rules) == 0 }

// check returns the rule matching token. Every rule is compared in constant
// time, and all of them are, so the time taken says nothing about which
// rule (or how much of a token) matched.
func (a *authorizer) check(token string) (*tokenRule, bool) {
	if a.open() {
		return &tokenRule{}, true
	}
	var match *tokenRule
	t := []byte(token)
	for i := range a.rules {
		if subtle.ConstantTimeCompare(a.rules[i].token, t) == 1 && match == nil {
			match = &a.rules[i]
		}
	}
	return match, match != nil
}
