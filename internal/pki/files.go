package pki

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The file names of the CA in a PKI directory.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

const (
	certMode = 0o644 // certificates are public
	keyMode  = 0o600 // keys are for their owner only
	dirMode  = 0o755 // the directory holds public certificates too
)

// Paths returns the certificate and key paths of base in dir:
// dir/base.pem and dir/base-key.pem.
func Paths(dir, base string) (cert, key string) {
	return filepath.Join(dir, base+".pem"), filepath.Join(dir, base+"-key.pem")
}

// ValidFileBase checks that base can name files in a PKI directory: 1 to
// 100 characters of letters, digits and ._-+@= not starting with a dot or a
// dash, so that no id or name can write outside the directory or look like
// a flag.
func ValidFileBase(base string) error {
	if base == "" || len(base) > 100 || base[0] == '.' || base[0] == '-' {
		return fmt.Errorf("file name %q: must be 1-100 characters, not starting with '.' or '-'", base)
	}
	for i := 0; i < len(base); i++ {
		c := base[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' || c == '+' || c == '@' || c == '='
		if !ok {
			return fmt.Errorf("file name %q: character %q not allowed (letters, digits and ._-+@=)", base, c)
		}
	}
	return nil
}

// WriteFiles writes the CA into dir as ca.pem and ca-key.pem and returns
// their paths. An existing file is an error unless force.
func (ca *CA) WriteFiles(dir string, force bool) (certPath, keyPath string, err error) {
	certPath, keyPath = filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	return certPath, keyPath, writePair(dir, certPath, keyPath, ca.Cert.Raw, ca.Key, force)
}

// WriteFiles writes the leaf into dir as base.pem and base-key.pem and
// returns their paths. An existing file is an error unless force.
func (l *Leaf) WriteFiles(dir, base string, force bool) (certPath, keyPath string, err error) {
	if err := ValidFileBase(base); err != nil {
		return "", "", fmt.Errorf("pki: %w", err)
	}
	certPath, keyPath = Paths(dir, base)
	return certPath, keyPath, writePair(dir, certPath, keyPath, l.Cert.Raw, l.Key, force)
}

// LoadCA reads ca.pem and ca-key.pem from dir, to issue more certificates.
func LoadCA(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	cert, err := ReadCert(certPath)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("pki: %s is not a CA certificate (no CA basic constraint or cert-sign key usage)", certPath)
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, err
	}
	if !samePublicKey(cert.PublicKey, key.Public()) {
		return nil, fmt.Errorf("pki: %s is not the key of %s", keyPath, certPath)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// ReadCert reads the first certificate of a PEM file.
func ReadCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: read certificate: %w", err)
	}
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return nil, fmt.Errorf("pki: %s holds no PEM CERTIFICATE block", path)
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: parse certificate %s: %w", path, err)
		}
		return cert, nil
	}
}

// readKey reads a PEM private key: PKCS#8 (what we write), SEC 1 EC or PKCS#1 RSA.
func readKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: read key: %w", err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("pki: %s holds no PEM block", path)
	}
	var key any
	switch b.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("pki: %s: PEM block %q is not a private key", path, b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("pki: parse key %s: %w", path, err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("pki: key %s (%T) cannot sign", path, key)
	}
	return s, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// writePair writes a certificate (DER) and its key as PEM files. Without
// force it refuses when either file exists, and never leaves half a pair.
func writePair(dir, certPath, keyPath string, certDER []byte, key crypto.Signer, force bool) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("pki: encode key for %s: %w", keyPath, err)
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if !force {
		for _, p := range []string{certPath, keyPath} {
			if _, err := os.Lstat(p); err == nil {
				return fmt.Errorf("pki: %s exists; not overwritten (use --force to replace it)", p)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("pki: %w", err)
			}
		}
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if err := writeFile(keyPath, keyPEM, keyMode, force); err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})
	if err := writeFile(certPath, certPEM, certMode, force); err != nil {
		if !force {
			_ = os.Remove(keyPath) // ours: written a moment ago
		}
		return err
	}
	return nil
}

// writeFile writes data to path through a temporary file in the same
// directory, so a reader never sees a partial file: the temporary file is
// renamed over path when force, else hard-linked to it, which fails if path
// exists (no check-then-write race).
func writeFile(path string, data []byte, mode os.FileMode, force bool) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tether-pki-*")
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	defer func() {
		_ = os.Remove(tmp.Name())
		if err != nil {
			err = fmt.Errorf("pki: write %s: %w", path, err)
		}
	}()
	if err = tmp.Chmod(mode); err == nil {
		if _, err = tmp.Write(data); err == nil {
			err = tmp.Sync()
		}
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if force {
		return os.Rename(tmp.Name(), path)
	}
	return os.Link(tmp.Name(), path)
}
