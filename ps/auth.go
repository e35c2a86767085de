package ps

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/tether-net/tether/internal/cidr"
	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/internal/pki"
	"github.com/tether-net/tether/tunnel"
)

// tokenRule is one line of a token file: a token, the agent ids its holder
// may act as, and the addresses those agents may expose.
type tokenRule struct {
	token []byte
	ids   []string  // exact ids or globs with '*'
	cidrs cidr.List // empty = only the tunnel's source address
	// key names the credential in the registry and in quotas without
	// revealing the token: a prefix of its SHA-256.
	key string
}

// mayActAs reports whether the rule's holder may be agent id.
func (r *tokenRule) mayActAs(id string) bool {
	for _, pat := range r.ids {
		if globMatch(pat, id) {
			return true
		}
	}
	return false
}

// globMatch matches id against pat, where '*' stands for any run of
// characters (ids may contain '/', so path.Match's rules do not fit).
func globMatch(pat, id string) bool {
	star := strings.IndexByte(pat, '*')
	if star < 0 {
		return pat == id
	}
	if !strings.HasPrefix(id, pat[:star]) {
		return false
	}
	rest, id := pat[star+1:], id[star:]
	for i := 0; i <= len(id); i++ {
		if globMatch(rest, id[i:]) {
			return true
		}
	}
	return false
}

// authorizer checks agents' credentials: tokens from a token file (or the
// single token of the env), client certificates when the PS requires them,
// or nothing at all with --insecure.
type authorizer struct {
	// mu guards rules, which a SIGHUP replaces (reload) while handshakes
	// read them.
	mu         sync.RWMutex
	rules      []tokenRule
	certs      bool // the TLS listener requires client certificates
	insecure   bool
	nameSource string // where the tokens came from, for errors
}

// currentRules returns the token rules in force.
func (a *authorizer) currentRules() []tokenRule {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.rules
}

// reload re-reads the token file and puts its rules in force, returning
// what changed. Only a token file can be reloaded: tokens from the env
// cannot change under a running process, and a PS that started without
// tokens (client certificates only, or --insecure) keeps its mode, since
// turning token checks on or off is a change of security model that a
// restart should make.
func (a *authorizer) reload(file string) (string, error) {
	if file == "" {
		return "nothing: the tokens do not come from --token-file", nil
	}
	f, err := os.Open(file)
	if err != nil {
		return "", fmt.Errorf("reload --token-file: %w", err)
	}
	defer f.Close()
	rules, err := parseTokens(bufio.NewScanner(f), file)
	if err != nil {
		return "", fmt.Errorf("reload --token-file: %w", err)
	}
	a.mu.Lock()
	old := a.rules
	a.rules = rules
	a.mu.Unlock()
	added, removed := diffTokens(old, rules)
	return fmt.Sprintf("token file %s: %d tokens (%d added, %d removed; tunnels already up keep running)", file, len(rules), added, removed), nil
}

// diffTokens counts the tokens of next that old lacks, and the reverse. A
// token whose line changed (ids, CIDRs) counts as neither: it is the same
// credential with new rights.
func diffTokens(old, next []tokenRule) (added, removed int) {
	have := make(map[string]bool, len(old))
	for _, r := range old {
		have[r.key] = true
	}
	now := make(map[string]bool, len(next))
	for _, r := range next {
		now[r.key] = true
		if !have[r.key] {
			added++
		}
	}
	for k := range have {
		if !now[k] {
			removed++
		}
	}
	return added, removed
}

// credential is what one agent authenticated with.
type credential struct {
	// key identifies the credential: a session may supersede a live
	// session of the same agent id only with the same key, quotas count per
	// key, and the registry refuses a target to another key.
	key string
	// cidrs bound the addresses the agent may expose; when neither the
	// token nor the certificate lists any, an endpoint must be on the
	// tunnel's source address.
	tokenCIDRs cidr.List
	certAddrs  []netip.Addr
}

// listsAddrs reports whether the credential names the addresses it may
// expose (else only the tunnel's own source address is allowed).
func (c *credential) listsAddrs() bool { return len(c.tokenCIDRs) > 0 || len(c.certAddrs) > 0 }

// allows reports whether the credential's own lists allow a. Both lists
// bound it when both are present.
func (c *credential) allows(a netip.Addr) bool {
	a = a.Unmap()
	if len(c.tokenCIDRs) > 0 && !c.tokenCIDRs.Contains(a) {
		return false
	}
	if len(c.certAddrs) > 0 {
		for _, ca := range c.certAddrs {
			if ca == a {
				return true
			}
		}
		return false
	}
	return true
}

// loadAuthorizer builds the PS's authorizer from its config: the token
// file (or the env token), client certificates, --insecure. Without any
// credential and without --insecure it refuses, so that an open PS is
// always a deliberate choice.
func loadAuthorizer(cfg *Config, env string) (*authorizer, error) {
	a := &authorizer{certs: cfg.TLSCA != "", insecure: cfg.Insecure}
	switch {
	case cfg.TokenFile != "":
		f, err := os.Open(cfg.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("--token-file: %w", err)
		}
		defer f.Close()
		if a.rules, err = parseTokens(bufio.NewScanner(f), cfg.TokenFile); err != nil {
			return nil, err
		}
		a.nameSource = cfg.TokenFile
	case strings.TrimSpace(os.Getenv(env)) != "":
		// The env holds a whole rule, so that it too says which agents it
		// is for: "TOKEN AGENT_IDS [CIDRS]".
		rules, err := parseTokens(bufio.NewScanner(strings.NewReader(os.Getenv(env))), "env "+env)
		if err != nil {
			return nil, err
		}
		a.rules, a.nameSource = rules, "env "+env
	}
	hasCreds := len(a.rules) > 0 || a.certs
	switch {
	case !hasCreds && !a.insecure:
		return nil, errors.New("no agent credentials: give --token-file (or env " + env + "), or --tls-ca to require client certificates; --insecure accepts any agent (experiments only)")
	case hasCreds && a.insecure:
		return nil, errors.New("--insecure contradicts the credentials given (--token-file, env " + env + " or --tls-ca): drop one or the other")
	}
	return a, nil
}

// parseTokens reads token rules: "TOKEN AGENT_IDS [CIDRS]" per line, where
// AGENT_IDS is a comma list of ids or '*' globs and CIDRS a comma list.
// Blank lines and lines starting with # are skipped. A line in the old
// format ("TOKEN" or "TOKEN CIDRS") is refused with the fix in the error, so
// that no upgrade silently widens or narrows what a token may do.
func parseTokens(sc *bufio.Scanner, name string) ([]tokenRule, error) {
	var rules []tokenRule
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		r, err := parseTokenLine(strings.Fields(text))
		if err != nil {
			return nil, fmt.Errorf("token file %s line %d: %w", name, line, err)
		}
		rules = append(rules, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read token file %s: %w", name, err)
	}
	if len(rules) == 0 {
		return nil, fmt.Errorf("token file %s holds no token", name)
	}
	return rules, nil
}

func parseTokenLine(fields []string) (tokenRule, error) {
	const format = "want 'TOKEN AGENT_IDS [CIDRS]'"
	switch {
	case len(fields) > 3:
		return tokenRule{}, fmt.Errorf("%d fields, %s (lists are comma-separated, without blanks)", len(fields), format)
	case len(fields[0]) > tunnel.MaxTokenLen:
		return tokenRule{}, fmt.Errorf("token longer than %d bytes", tunnel.MaxTokenLen)
	case len(fields) == 1:
		return tokenRule{}, fmt.Errorf("token without agent ids, %s: write 'TOKEN *' to let it act as any agent id, as before (see the README's upgrade notes)", format)
	case looksLikeCIDRs(fields[1]):
		return tokenRule{}, fmt.Errorf("second field %q looks like CIDRs (the old 'TOKEN CIDRS' format), %s: write 'TOKEN * %s' to keep its meaning", fields[1], format, fields[1])
	}
	sum := sha256.Sum256([]byte(fields[0]))
	r := tokenRule{token: []byte(fields[0]), key: "tok:" + hex.EncodeToString(sum[:8])}
	for _, id := range strings.Split(fields[1], ",") {
		if id == "" {
			continue
		}
		// A glob is checked as an id with its stars, which ident allows.
		if err := ident.Valid(id); err != nil {
			return tokenRule{}, fmt.Errorf("agent ids: %w", err)
		}
		r.ids = append(r.ids, id)
	}
	if len(r.ids) == 0 {
		return tokenRule{}, fmt.Errorf("empty agent id list, %s", format)
	}
	if len(fields) == 3 {
		l, err := cidr.Parse(strings.Split(fields[2], ","))
		if err != nil {
			return tokenRule{}, err
		}
		r.cidrs = l
	}
	return r, nil
}

// looksLikeCIDRs reports whether s is a list of addresses or prefixes
// rather than agent ids: ids may look like IPs, but never contain '/'.
func looksLikeCIDRs(s string) bool {
	for _, f := range strings.Split(s, ",") {
		if strings.Contains(f, "/") {
			return true
		}
	}
	return false
}

// authenticate returns the credential of an agent that claims id with
// token over conn, or a Refuse saying why it may not.
func (a *authorizer) authenticate(conn any, id, token string, source netip.Addr) (*credential, error) {
	var keys []string
	cred := &credential{}
	if a.certs {
		tc, ok := conn.(*tls.Conn)
		if !ok {
			return nil, unauthorized("no client certificate")
		}
		certID, addrs, err := pki.PeerAgent(tc.ConnectionState())
		if err != nil {
			return nil, unauthorized(err.Error())
		}
		if certID != id {
			return nil, unauthorized(fmt.Sprintf("the client certificate is for agent %q, not %q", certID, id))
		}
		cred.certAddrs = addrs
		keys = append(keys, "cert:"+certID)
	}
	if rules := a.currentRules(); len(rules) > 0 {
		rule := match(rules, token)
		if rule == nil {
			return nil, unauthorized("token not accepted")
		}
		if !rule.mayActAs(id) {
			return nil, unauthorized(fmt.Sprintf("this token may not act as agent %q", id))
		}
		cred.tokenCIDRs = rule.cidrs
		keys = append(keys, rule.key)
	}
	if len(keys) == 0 {
		// --insecure: anyone, one credential per source address, so that
		// quotas still separate hosts.
		keys = append(keys, "anon:"+source.String())
	}
	cred.key = strings.Join(keys, "+")
	return cred, nil
}

func unauthorized(reason string) error {
	return &tunnel.Refuse{Code: tunnel.CodeUnauthorized, Reason: reason}
}

// match returns the rule whose token equals token. Every rule is compared
// in constant time, and all of them are, so the time taken says nothing
// about which rule (or how much of a token) matched.
func match(rules []tokenRule, token string) *tokenRule {
	var found *tokenRule
	t := []byte(token)
	for i := range rules {
		if subtle.ConstantTimeCompare(rules[i].token, t) == 1 && found == nil {
			found = &rules[i]
		}
	}
	return found
}
