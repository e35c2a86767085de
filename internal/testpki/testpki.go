// Package testpki owns throwaway certificate authorities and certificates
// for tests of TLS on tunnels. It makes them with internal/pki, the code
// behind `tether certs`, so tests run on the certificates operators get.
package testpki

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/pki"
)

// validFor is the life of test certificates: longer than any test.
const validFor = 24 * time.Hour

// PKI is a throwaway CA with a server certificate for 127.0.0.1 and a
// client certificate for agent id "agent", written as PEM files.
type PKI struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
	OtherCA                                          string // a CA that signed nothing here

	dir string
	ca  *pki.CA
}

// NewPKI writes a fresh PKI into a temporary directory.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	dir := t.TempDir()
	ca := newCA(t, dir, "tether test CA")
	newCA(t, filepath.Join(dir, "other"), "unrelated CA")
	p := &PKI{CA: filepath.Join(dir, pki.CACertFile), OtherCA: filepath.Join(dir, "other", pki.CACertFile), dir: dir, ca: ca}
	srv, err := ca.IssueServer("ps", nil, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, validFor)
	if err != nil {
		t.Fatal(err)
	}
	p.ServerCert, p.ServerKey = write(t, srv, dir, "server")
	p.ClientCert, p.ClientKey = p.Agent(t, "agent")
	return p
}

// Agent issues a client certificate from the PKI's CA that speaks for agent
// id and lists ips as the addresses it may expose, and returns its files.
func (p *PKI) Agent(t testing.TB, id string, ips ...netip.Addr) (cert, key string) {
	t.Helper()
	leaf, err := p.ca.IssueAgent(id, ips, validFor)
	if err != nil {
		t.Fatal(err)
	}
	// A counter-free unique name: the certificate's serial number.
	return write(t, leaf, p.dir, "agent-"+leaf.Cert.SerialNumber.Text(36))
}

func newCA(t testing.TB, dir, name string) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA(name, 2*validFor)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.WriteFiles(dir, false); err != nil {
		t.Fatal(err)
	}
	return ca
}

func write(t testing.TB, leaf *pki.Leaf, dir, base string) (cert, key string) {
	t.Helper()
	cert, key, err := leaf.WriteFiles(dir, base, false)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}
