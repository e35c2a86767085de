// Package pki owns tether's certificates: a private CA, the server
// certificates of PS nodes, the client certificates of agents (whose
// identity, an agent id and the addresses it may expose, is written into
// the certificate and read back by AgentIdentity and AgentAddrs), and the
// PEM files they live in.
//
// Keys are ECDSA P-256. Key files are written 0600, certificates 0644, and
// an existing file is never replaced unless the caller forces it: a CA key
// overwritten by mistake would orphan every certificate it signed.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"time"

	"github.com/tether-net/tether/internal/ident"
)

const (
	// DefaultCAValidity is how long a new CA is valid.
	DefaultCAValidity = 10 * 365 * 24 * time.Hour
	// DefaultLeafValidity is how long a PS or agent certificate is valid.
	// Long, because a PS and an agent read their certificate once at start:
	// an expiry is an outage until they are restarted with a new one.
	DefaultLeafValidity = 2 * 365 * 24 * time.Hour
	// backdate is how far NotBefore lies in the past, so that a host whose
	// clock is a little behind the issuer's accepts a fresh certificate.
	backdate = time.Hour
)

// CA is a certificate authority: its certificate and the key that signs.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// Leaf is an issued certificate and its private key.
type Leaf struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA makes a self-signed CA named name, valid for validFor from now
// (DefaultCAValidity when validFor is 0).
func NewCA(name string, validFor time.Duration) (*CA, error) {
	if name == "" {
		return nil, errors.New("pki: the CA needs a name")
	}
	validFor, err := validity(validFor, DefaultCAValidity)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"tether"}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validFor),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // it signs leaves only, never another CA
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("pki: sign CA %q: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse new CA %q: %w", name, err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// IssueServer issues a PS server certificate (ExtKeyUsageServerAuth) named
// name for the DNS names and IP addresses agents dial it by. At least one
// of them is needed: agents verify the PS by them, never by the name.
func (ca *CA) IssueServer(name string, dnsNames []string, ips []netip.Addr, validFor time.Duration) (*Leaf, error) {
	if name == "" {
		return nil, errors.New("pki: the server certificate needs a name")
	}
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, fmt.Errorf("pki: server certificate %q: give at least one DNS name or IP address that agents dial", name)
	}
	for _, d := range dnsNames {
		if d == "" {
			return nil, fmt.Errorf("pki: server certificate %q: empty DNS name", name)
		}
	}
	netIPs, err := toNetIPs(ips)
	if err != nil {
		return nil, fmt.Errorf("pki: server certificate %q: %w", name, err)
	}
	return ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: name, Organization: []string{"tether"}},
		DNSNames:    dnsNames,
		IPAddresses: netIPs,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, validFor)
}

// IssueAgent issues an agent client certificate (ExtKeyUsageClientAuth)
// that speaks for agent id: Subject CN = id and a URI SAN AgentURI(id).
// ips, when given, are the addresses the agent may expose (IP SANs); with
// none, the PS lets it expose only its tunnel's source address.
func (ca *CA) IssueAgent(id string, ips []netip.Addr, validFor time.Duration) (*Leaf, error) {
	if err := ident.Valid(id); err != nil {
		return nil, fmt.Errorf("pki: agent certificate: %w", err)
	}
	netIPs, err := toNetIPs(ips)
	if err != nil {
		return nil, fmt.Errorf("pki: agent certificate %q: %w", id, err)
	}
	return ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: id, Organization: []string{"tether"}},
		URIs:        []*url.URL{AgentURI(id)},
		IPAddresses: netIPs,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, validFor)
}

// issue completes tmpl as a leaf of ca, with a fresh key, and signs it.
func (ca *CA) issue(tmpl *x509.Certificate, validFor time.Duration) (*Leaf, error) {
	validFor, err := validity(validFor, DefaultLeafValidity)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notAfter := now.Add(validFor)
	if notAfter.After(ca.Cert.NotAfter) {
		return nil, fmt.Errorf("pki: certificate %q: valid for %s would outlive the CA, which expires %s",
			tmpl.Subject.CommonName, validFor, ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(ca.Cert.NotBefore) || now.After(ca.Cert.NotAfter) {
		return nil, fmt.Errorf("pki: the CA %q is not valid now (valid %s to %s)", ca.Cert.Subject.CommonName,
			ca.Cert.NotBefore.UTC().Format(time.RFC3339), ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate key: %w", err)
	}
	if tmpl.SerialNumber, err = newSerial(); err != nil {
		return nil, err
	}
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-backdate), notAfter
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("pki: sign certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse new certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return &Leaf{Cert: cert, Key: key}, nil
}

func validity(d, def time.Duration) (time.Duration, error) {
	switch {
	case d == 0:
		return def, nil
	case d < 0:
		return 0, fmt.Errorf("pki: validity %s: must be positive", d)
	}
	return d, nil
}

// newSerial draws a random 127-bit serial number (positive, as RFC 5280 wants).
func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

// toNetIPs turns addresses into IP SANs, unmapping v4-in-v6 so that
// 10.1.2.3 is written (and later matched) as an IPv4 address.
func toNetIPs(ips []netip.Addr) ([]net.IP, error) {
	var out []net.IP
	for _, a := range ips {
		if !a.IsValid() || a.IsUnspecified() || a.Zone() != "" {
			return nil, fmt.Errorf("IP address %q: not an address a peer can be reached at (unspecified, or with a zone)", a)
		}
		out = append(out, net.IP(a.Unmap().AsSlice()))
	}
	return out, nil
}
