package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustCA(t *testing.T) *CA {
	t.Helper()
	ca, err := NewCA("tether test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func verify(leaf *x509.Certificate, ca *CA, usage x509.ExtKeyUsage, dns string) error {
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}, DNSName: dns})
	return err
}

func TestNewCAIsAP256CAValidTenYears(t *testing.T) {
	ca := mustCA(t)
	c := ca.Cert
	if !c.IsCA || !c.BasicConstraintsValid || c.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Fatalf("not a CA: IsCA=%v constraints=%v usage=%v", c.IsCA, c.BasicConstraintsValid, c.KeyUsage)
	}
	if pub, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("CA key is %T, want ECDSA P-256", c.PublicKey)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Fatalf("not self-signed: %v", err)
	}
	if left := time.Until(c.NotAfter); left < DefaultCAValidity-time.Minute || left > DefaultCAValidity+time.Minute {
		t.Fatalf("CA valid for %s more, want about %s", left, DefaultCAValidity)
	}
	if _, err := NewCA("", 0); err == nil {
		t.Fatal("a CA without a name was made")
	}
	if _, err := NewCA("x", -time.Hour); err == nil {
		t.Fatal("a CA with a negative validity was made")
	}
}

// Certificates issued from a CA loaded back from disk verify against the
// CA for their own usage only: a PS certificate cannot act as an agent's,
// nor an agent's as a PS's.
func TestIssueFromLoadedCAVerifiesForTheRightUsage(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	orig := mustCA(t)
	if _, _, err := orig.WriteFiles(dir, false); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.Cert.Equal(orig.Cert) {
		t.Fatal("loaded CA differs from the written one")
	}

	ps, err := ca.IssueServer("ps1", []string{"ps.example.internal"}, []netip.Addr{netip.MustParseAddr("10.0.0.10")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(ps.Cert, orig, x509.ExtKeyUsageServerAuth, "ps.example.internal"); err != nil {
		t.Fatalf("PS cert by DNS name: %v", err)
	}
	if err := verify(ps.Cert, orig, x509.ExtKeyUsageServerAuth, "10.0.0.10"); err != nil {
		t.Fatalf("PS cert by IP: %v", err)
	}
	if err := verify(ps.Cert, orig, x509.ExtKeyUsageServerAuth, "other.example.internal"); err == nil {
		t.Fatal("PS cert verified for a name it does not hold")
	}
	if err := verify(ps.Cert, orig, x509.ExtKeyUsageClientAuth, ""); err == nil {
		t.Fatal("PS cert verified as a client certificate")
	}

	ag, err := ca.IssueAgent("a1", []netip.Addr{netip.MustParseAddr("10.1.2.3")}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(ag.Cert, orig, x509.ExtKeyUsageClientAuth, ""); err != nil {
		t.Fatalf("agent cert: %v", err)
	}
	if err := verify(ag.Cert, orig, x509.ExtKeyUsageServerAuth, ""); err == nil {
		t.Fatal("agent cert verified as a server certificate")
	}
	if left := time.Until(ag.Cert.NotAfter); left > time.Hour || left < 59*time.Minute {
		t.Fatalf("agent cert valid for %s more, asked 1h", left)
	}
	if ag.Cert.Subject.CommonName != "a1" || len(ag.Cert.URIs) != 1 || ag.Cert.URIs[0].String() != "spiffe://tether/agent/a1" {
		t.Fatalf("agent cert names CN %q, URIs %v", ag.Cert.Subject.CommonName, ag.Cert.URIs)
	}

	other := mustCA(t)
	if err := verify(ag.Cert, other, x509.ExtKeyUsageClientAuth, ""); err == nil {
		t.Fatal("agent cert verified against an unrelated CA")
	}
}

func TestIssueRefusesBadInput(t *testing.T) {
	ca := mustCA(t)
	ip := []netip.Addr{netip.MustParseAddr("10.0.0.1")}
	for name, f := range map[string]func() error{
		"server without names": func() error { _, err := ca.IssueServer("ps1", nil, nil, 0); return err },
		"server without name":  func() error { _, err := ca.IssueServer("", nil, ip, 0); return err },
		"server unspecified ip": func() error {
			_, err := ca.IssueServer("ps1", nil, []netip.Addr{netip.IPv4Unspecified()}, 0)
			return err
		},
		"agent bad id":      func() error { _, err := ca.IssueAgent("a:1", nil, 0); return err },
		"agent empty id":    func() error { _, err := ca.IssueAgent("", nil, 0); return err },
		"agent invalid ip":  func() error { _, err := ca.IssueAgent("a1", []netip.Addr{{}}, 0); return err },
		"outlives the CA":   func() error { _, err := ca.IssueAgent("a1", nil, 11*365*24*time.Hour); return err },
		"negative validity": func() error { _, err := ca.IssueAgent("a1", nil, -time.Second); return err },
	} {
		if err := f(); err == nil {
			t.Errorf("%s: issued", name)
		}
	}
}

func TestIPSANsAreWrittenUnmapped(t *testing.T) {
	ca := mustCA(t)
	ag, err := ca.IssueAgent("a1", []netip.Addr{netip.MustParseAddr("::ffff:10.1.2.3"), netip.MustParseAddr("2001:db8::1")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ag.Cert.IPAddresses) != 2 || len(ag.Cert.IPAddresses[0]) != 4 {
		t.Fatalf("IP SANs %v (first %d bytes), want a 4-byte 10.1.2.3 first", ag.Cert.IPAddresses, len(ag.Cert.IPAddresses[0]))
	}
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestWriteFilesModesAndNoOverwrite(t *testing.T) {
	dir := t.TempDir()
	ca := mustCA(t)
	certPath, keyPath, err := ca.WriteFiles(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	if m := mode(t, certPath); m != 0o644 {
		t.Errorf("%s mode %o, want 644", certPath, m)
	}
	if m := mode(t, keyPath); m != 0o600 {
		t.Errorf("%s mode %o, want 600", keyPath, m)
	}
	before, _ := os.ReadFile(keyPath)

	again := mustCA(t)
	_, _, err = again.WriteFiles(dir, false)
	if err == nil || !strings.Contains(err.Error(), "exists") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second CA over the first: %v", err)
	}
	if after, _ := os.ReadFile(keyPath); string(after) != string(before) {
		t.Fatal("the CA key was changed by a refused write")
	}

	// A pair whose key alone exists is refused too, and the key is kept.
	leaf, err := ca.IssueAgent("a1", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	lc, lk := Paths(dir, "agent-a1")
	if err := os.WriteFile(lk, []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := leaf.WriteFiles(dir, "agent-a1", false); err == nil {
		t.Fatal("wrote over an existing key")
	}
	if _, err := os.Stat(lc); err == nil {
		t.Fatal("half a pair was written")
	}

	if _, _, err := again.WriteFiles(dir, true); err != nil {
		t.Fatalf("--force: %v", err)
	}
	loaded, err := LoadCA(dir)
	if err != nil || !loaded.Cert.Equal(again.Cert) {
		t.Fatalf("after --force the CA is not the new one: %v", err)
	}
	if m := mode(t, keyPath); m != 0o600 {
		t.Errorf("forced %s mode %o, want 600", keyPath, m)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 3 {
		t.Errorf("temporary files left behind: %v", ents)
	}
}

func TestLoadCARefusesWhatIsNotACA(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadCA(dir); err == nil {
		t.Fatal("loaded a CA from an empty directory")
	}
	ca := mustCA(t)
	leaf, err := ca.IssueAgent("a1", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A leaf written under the CA's names is not a CA.
	if _, _, err := (&CA{Cert: leaf.Cert, Key: leaf.Key}).WriteFiles(dir, false); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(dir); err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Fatalf("leaf loaded as CA: %v", err)
	}
	// A CA with someone else's key.
	other := mustCA(t)
	if _, _, err := (&CA{Cert: ca.Cert, Key: other.Key}).WriteFiles(dir, true); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(dir); err == nil || !strings.Contains(err.Error(), "not the key") {
		t.Fatalf("CA with a foreign key loaded: %v", err)
	}
}

func TestValidFileBase(t *testing.T) {
	for base, ok := range map[string]bool{
		"ps1": true, "agent-a1": true, "agent-host_1.example+x@y=z": true,
		"": false, ".": false, "..": false, ".hidden": false, "-flag": false,
		"a/b": false, `a\b`: false, "a b": false, "a*": false, strings.Repeat("a", 101): false,
	} {
		if err := ValidFileBase(base); (err == nil) != ok {
			t.Errorf("ValidFileBase(%q) = %v, want ok=%v", base, err, ok)
		}
	}
}
