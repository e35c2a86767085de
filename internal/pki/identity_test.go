package pki

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
)

func certWith(cn string, uris ...string) *x509.Certificate {
	c := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: cn}}
	for _, s := range uris {
		u, err := url.Parse(s)
		if err != nil {
			panic(err)
		}
		c.URIs = append(c.URIs, u)
	}
	return c
}

func TestAgentIdentity(t *testing.T) {
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		want string // "" = error
		err  string // part of the error
	}{
		{"CN only", certWith("a1"), "a1", ""},
		{"URI only", certWith("", "spiffe://tether/agent/a1"), "a1", ""},
		{"URI only, other trust domain", certWith("", "spiffe://corp.example/agent/a1"), "a1", ""},
		{"URI only, tether path", certWith("", "spiffe://corp.example/tether/agent/host-7"), "host-7", ""},
		{"escaped id", certWith("", "spiffe://tether/agent/a%2Fb"), "a/b", ""},
		{"CN and URI agree", certWith("a1", "spiffe://tether/agent/a1"), "a1", ""},
		{"other URIs ignored", certWith("a1", "spiffe://tether/ns/x/sa/y", "https://example.com/agent/a2"), "a1", ""},
		{"CN and URI disagree", certWith("a1", "spiffe://tether/agent/a2"), "", "two agents"},
		{"two URIs disagree", certWith("", "spiffe://tether/agent/a1", "spiffe://other/agent/a2"), "", "two agents"},
		{"no identity", certWith(""), "", "names no agent"},
		{"no identity, only other URIs", certWith("", "spiffe://tether/workload/w1"), "", "names no agent"},
		{"invalid CN", certWith("bad id"), "", "not allowed"},
		{"invalid CN colon", certWith("a:1"), "", "not allowed"},
		{"invalid URI id", certWith("", "spiffe://tether/agent/a%3A1"), "", "not allowed"},
		{"URI with no id", certWith("", "spiffe://tether/agent/"), "", "want spiffe"},
		{"URI prefix alone", certWith("", "spiffe://tether/agent"), "", "want spiffe"},
		{"URI with two elements", certWith("a1", "spiffe://tether/agent/x/a1"), "", "want spiffe"},
		{"URI with a port", certWith("", "spiffe://tether:8443/agent/a1"), "", "want spiffe"},
		{"URI with a query", certWith("", "spiffe://tether/agent/a1?x=1"), "", "want spiffe"},
		{"URI without trust domain", certWith("", "spiffe:///agent/a1"), "", "want spiffe"},
		{"nil", nil, "", "no client certificate"},
	} {
		got, err := AgentIdentity(tc.cert)
		if tc.want != "" && (err != nil || got != tc.want) {
			t.Errorf("%s: got %q, %v; want %q", tc.name, got, err, tc.want)
		}
		if tc.want == "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: got %q, %v; want an error with %q", tc.name, got, err, tc.err)
		}
	}
}

// What IssueAgent writes, AgentIdentity reads back, for every kind of id
// ident.Valid accepts, including ones that need escaping in a URI.
func TestIssuedAgentIdentityRoundTrips(t *testing.T) {
	ca := mustCA(t)
	for _, id := range []string{"a1", "host-198.18.1.11", "a/b", "x%y", "~!#$&*()[]<>?|@=,;"} {
		leaf, err := ca.IssueAgent(id, nil, 0)
		if err != nil {
			t.Fatalf("issue %q: %v", id, err)
		}
		reparsed, err := x509.ParseCertificate(leaf.Cert.Raw)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := AgentIdentity(reparsed); err != nil || got != id {
			t.Errorf("id %q: read back %q, %v", id, got, err)
		}
		reparsed.Subject.CommonName = "" // the URI SAN alone names it too
		if got, err := AgentIdentity(reparsed); err != nil || got != id {
			t.Errorf("id %q from its URI %v: read back %q, %v", id, reparsed.URIs, got, err)
		}
	}
}

func TestAgentAddrs(t *testing.T) {
	c := &x509.Certificate{IPAddresses: []net.IP{
		net.ParseIP("::ffff:10.1.2.3"), // 16-byte v4-mapped
		net.IPv4(10, 1, 2, 3).To4(),    // the same address, 4 bytes
		net.ParseIP("2001:db8::1"),
		{1, 2, 3}, // garbage length: skipped
	}}
	want := []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("2001:db8::1")}
	if got := AgentAddrs(c); !slices.Equal(got, want) {
		t.Fatalf("AgentAddrs = %v, want %v", got, want)
	}
	if got := AgentAddrs(&x509.Certificate{}); len(got) != 0 {
		t.Fatalf("no IP SANs gave %v", got)
	}
	if got := AgentAddrs(nil); got != nil {
		t.Fatalf("nil gave %v", got)
	}
}

func TestPeerAgentNeedsAVerifiedChain(t *testing.T) {
	leaf := certWith("a1")
	if _, _, err := PeerAgent(tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}); err == nil {
		t.Fatal("an unverified peer certificate was trusted")
	}
	id, addrs, err := PeerAgent(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}})
	if err != nil || id != "a1" || len(addrs) != 0 {
		t.Fatalf("PeerAgent = %q, %v, %v", id, addrs, err)
	}
}
