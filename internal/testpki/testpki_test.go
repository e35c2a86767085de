package testpki

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/tether-net/tether/internal/pki"
)

func TestAgentCertificatesSpeakForTheirID(t *testing.T) {
	p := NewPKI(t)
	for _, tc := range []struct {
		cert, id string
		ips      []netip.Addr
	}{
		{p.ClientCert, "agent", nil},
		{mustCert(p.Agent(t, "a1", netip.MustParseAddr("127.77.0.1"))), "a1", []netip.Addr{netip.MustParseAddr("127.77.0.1")}},
		{mustCert(p.Agent(t, "a2")), "a2", nil},
	} {
		c, err := pki.ReadCert(tc.cert)
		if err != nil {
			t.Fatal(err)
		}
		if id, err := pki.AgentIdentity(c); err != nil || id != tc.id {
			t.Errorf("%s speaks for %q, %v; want %q", tc.cert, id, err, tc.id)
		}
		if got := pki.AgentAddrs(c); !slices.Equal(got, tc.ips) {
			t.Errorf("%s lists %v, want %v", tc.cert, got, tc.ips)
		}
	}
}

func mustCert(cert, _ string) string { return cert }
