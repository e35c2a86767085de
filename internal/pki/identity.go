package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strings"

	"github.com/tether-net/tether/internal/ident"
	"github.com/tether-net/tether/internal/textclip"
)

// AgentTrustDomain is the SPIFFE trust domain of the URI SANs IssueAgent
// writes: spiffe://tether/agent/<id>.
const AgentTrustDomain = "tether"

// The path prefixes of an agent URI SAN, after spiffe://<trust domain>.
var agentURIPrefixes = []string{"/agent/", "/tether/agent/"}

// AgentURI is the URI SAN that names agent id: spiffe://tether/agent/<id>,
// with id path-escaped (an id with a '/' in it stays one path element).
func AgentURI(id string) *url.URL {
	esc := url.PathEscape(id)
	u := &url.URL{Scheme: "spiffe", Host: AgentTrustDomain, Path: "/agent/" + id}
	if esc != id {
		u.RawPath = "/agent/" + esc
	}
	return u
}

// AgentIdentity returns the agent id a client certificate speaks for. The
// caller passes a certificate the TLS stack has verified against the PS's
// CA (see PeerAgent); AgentIdentity reads names, it does not verify.
//
// The id comes from the Subject CN and from URI SANs of the form
//
//	spiffe://<any trust domain>/agent/<id>
//	spiffe://<any trust domain>/tether/agent/<id>
//
// where <id> is exactly one path element (percent-escapes are decoded, so
// an id holding '/' is written a%2Fb). Other URI SANs are ignored; a
// spiffe URI under one of these prefixes with no id, more than one path
// element, a port, user, query or fragment is an error. It is an error when
// neither CN nor an agent URI is present, when they (or two agent URIs)
// name different ids, and when the id fails ident.Valid.
func AgentIdentity(cert *x509.Certificate) (string, error) {
	if cert == nil {
		return "", errors.New("no client certificate")
	}
	uriID, err := agentURIID(cert.URIs)
	if err != nil {
		return "", err
	}
	cn := cert.Subject.CommonName
	switch {
	case cn == "" && uriID == "":
		return "", fmt.Errorf("certificate (serial %s) names no agent: no Subject CN and no spiffe://<domain>/agent/<id> URI SAN", cert.SerialNumber)
	case cn != "" && uriID != "" && cn != uriID:
		return "", fmt.Errorf("certificate names two agents: Subject CN %q, URI SAN %q", textclip.Short(cn), textclip.Short(uriID))
	case cn == "":
		cn = uriID
	}
	if err := ident.Valid(cn); err != nil {
		return "", fmt.Errorf("certificate agent identity: %w", err)
	}
	return cn, nil
}

// agentURIID returns the id of the agent URI SANs among uris ("" when there
// is none), or an error when one is malformed or two disagree.
func agentURIID(uris []*url.URL) (string, error) {
	id := ""
	for _, u := range uris {
		rest, ok := agentURIPath(u)
		if !ok {
			continue
		}
		if u.Host == "" || u.User != nil || u.Port() != "" || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || rest == "" || strings.Contains(rest, "/") {
			return "", fmt.Errorf("agent URI SAN %q: want spiffe://<domain>/agent/<id>", textclip.Short(u.String()))
		}
		got, err := url.PathUnescape(rest)
		if err != nil {
			return "", fmt.Errorf("agent URI SAN %q: %w", textclip.Short(u.String()), err)
		}
		if id != "" && got != id {
			return "", fmt.Errorf("certificate names two agents in URI SANs: %q and %q", textclip.Short(id), textclip.Short(got))
		}
		id = got
	}
	return id, nil
}

// agentURIPath reports whether u is a spiffe URI under an agent prefix, and
// what follows the prefix (still escaped).
func agentURIPath(u *url.URL) (string, bool) {
	if u == nil || !strings.EqualFold(u.Scheme, "spiffe") {
		return "", false
	}
	p := u.EscapedPath()
	for _, prefix := range agentURIPrefixes {
		if rest, ok := strings.CutPrefix(p, prefix); ok {
			return rest, true
		}
		if p+"/" == prefix { // spiffe://d/agent: the prefix with no id
			return "", true
		}
	}
	return "", false
}

// AgentAddrs returns a client certificate's IP SANs, unmapped (::ffff:a.b.c.d
// becomes a.b.c.d) and without duplicates: the addresses the agent may
// expose. Empty means only its tunnel's source address.
func AgentAddrs(cert *x509.Certificate) []netip.Addr {
	if cert == nil {
		return nil
	}
	var out []netip.Addr
	seen := make(map[netip.Addr]bool, len(cert.IPAddresses))
	for _, ip := range cert.IPAddresses {
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			continue
		}
		if a = a.Unmap(); !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}

// PeerAgent returns the agent id and addresses of the client certificate
// of a finished TLS handshake, from the chain the TLS stack verified (never
// from an unverified peer certificate). It is an error when no client
// certificate was verified.
func PeerAgent(cs tls.ConnectionState) (string, []netip.Addr, error) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", nil, errors.New("no verified client certificate")
	}
	leaf := cs.VerifiedChains[0][0]
	id, err := AgentIdentity(leaf)
	if err != nil {
		return "", nil, err
	}
	return id, AgentAddrs(leaf), nil
}
