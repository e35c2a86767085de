package tunnel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFiles names the PEM files of one side of a tunnel.
type TLSFiles struct {
	Cert string // certificate chain presented to the peer
	Key  string // its private key
	CA   string // CA bundle the peer's certificate must chain to
}

// Enabled reports whether any TLS file is set: TLS is on when one is.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// ServerTLSConfig builds the PS side: it presents Cert/Key, and when CA is
// set it requires and verifies client certificates against it. It returns
// nil, nil when no file is set (plain TCP).
func ServerTLSConfig(f TLSFiles) (*tls.Config, error) {
	if !f.Enabled() {
		return nil, nil
	}
	if f.Cert == "" || f.Key == "" {
		return nil, errors.New("tls: the ps needs both --tls-cert and --tls-key (a --tls-ca alone cannot serve TLS)")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("tls: load key pair %s, %s: %w", f.Cert, f.Key, err)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if f.CA != "" {
		pool, err := loadPool(f.CA)
		if err != nil {
			return nil, err
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return c, nil
}

// ClientTLSConfig builds the agent side. With CA set it verifies the PS
// against that bundle, otherwise against the system roots: verification is
// never skipped. Cert/Key, when set, are the client certificate for a PS
// that requires one. It returns nil, nil when no file is set.
func ClientTLSConfig(f TLSFiles, serverName string) (*tls.Config, error) {
	if !f.Enabled() {
		return nil, nil
	}
	// A session cache lets the agent's pooled data connections (one per
	// client connection, tunnel/data.go) resume TLS sessions instead of
	// running a full handshake with certificate checks each time.
	c := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12, ClientSessionCache: tls.NewLRUClientSessionCache(256)}
	if (f.Cert == "") != (f.Key == "") {
		return nil, errors.New("tls: --tls-cert and --tls-key go together")
	}
	if f.Cert != "" {
		cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: load key pair %s, %s: %w", f.Cert, f.Key, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	if f.CA != "" {
		pool, err := loadPool(f.CA)
		if err != nil {
			return nil, err
		}
		c.RootCAs = pool
	}
	return c, nil
}

func loadPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tls: read ca %s: %w", path, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls: ca %s holds no PEM certificate", path)
	}
	return pool, nil
}
