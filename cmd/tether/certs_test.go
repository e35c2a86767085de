package main

import (
	"crypto/tls"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/pki"
	"github.com/tether-net/tether/tunnel"
)

// handshake runs one TLS handshake over loopback between a PS-side and an
// agent-side config and returns what the PS learned of the agent. A refusal
// on either side is an error.
func handshake(t *testing.T, srv, cli *tls.Config) (string, []netip.Addr, error) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		id    string
		addrs []netip.Addr
		err   error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		id, addrs, err := pki.PeerAgent(tc.ConnectionState())
		if err == nil {
			_, err = tc.Write([]byte("k"))
		}
		done <- result{id, addrs, err}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), cli)
	if err != nil {
		return "", nil, err
	}
	defer c.Close()
	// With TLS 1.3 the client finishes first: a client certificate the PS
	// refuses shows on the first read.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		<-done
		return "", nil, err
	}
	r := <-done
	return r.id, r.addrs, r.err
}

func serverTLS(t *testing.T, dir, name string) *tls.Config {
	t.Helper()
	cert, key := pki.Paths(dir, name)
	c, err := tunnel.ServerTLSConfig(tunnel.TLSFiles{Cert: cert, Key: key, CA: filepath.Join(dir, pki.CACertFile)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func clientTLS(t *testing.T, dir, base, caDir string) *tls.Config {
	t.Helper()
	f := tunnel.TLSFiles{CA: filepath.Join(caDir, pki.CACertFile)}
	if base != "" {
		f.Cert, f.Key = pki.Paths(dir, base)
	}
	c, err := tunnel.ClientTLSConfig(f, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Certificates made by `tether certs` carry mTLS between tunnel.ServerTLSConfig
// and tunnel.ClientTLSConfig, and the PS reads the agent's id and addresses
// from the verified client certificate.
func TestCertsCommandMakesWorkingMTLS(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	out, err := runTether(t, "certs", "init", "--dir", dir, "--ps-ip", "127.0.0.1", "--ps-dns", "ps.test", "--agent", "a1")
	if err != nil {
		t.Fatalf("certs init: %v\n%s", err, out)
	}
	for _, want := range []string{"--tls-cert " + filepath.Join(dir, "ps.pem"), "--tls-key " + filepath.Join(dir, "agent-a1-key.pem"), "--tls-ca " + filepath.Join(dir, "ca.pem")} {
		if !strings.Contains(out, want) {
			t.Errorf("certs init output lacks %q:\n%s", want, out)
		}
	}
	if out, err := runTether(t, "certs", "agent", "--dir", dir, "--id", "a2", "--ip", "127.77.0.9", "--ip", "::ffff:127.77.0.10"); err != nil {
		t.Fatalf("certs agent: %v\n%s", err, out)
	}
	srv := serverTLS(t, dir, "ps")

	id, addrs, err := handshake(t, srv, clientTLS(t, dir, "agent-a1", dir))
	if err != nil || id != "a1" || len(addrs) != 0 {
		t.Fatalf("agent a1: PS saw %q %v, %v", id, addrs, err)
	}
	id, addrs, err = handshake(t, srv, clientTLS(t, dir, "agent-a2", dir))
	want := []netip.Addr{netip.MustParseAddr("127.77.0.9"), netip.MustParseAddr("127.77.0.10")}
	if err != nil || id != "a2" || !slices.Equal(addrs, want) {
		t.Fatalf("agent a2: PS saw %q %v, %v; want a2 %v", id, addrs, err, want)
	}

	// Refused: no client certificate; the PS's own certificate used as a
	// client's (wrong usage); an agent of another CA; a PS the agent's CA
	// did not sign.
	other := filepath.Join(t.TempDir(), "other")
	if out, err := runTether(t, "certs", "init", "--dir", other, "--ps-ip", "127.0.0.1", "--agent", "a1"); err != nil {
		t.Fatalf("certs init (other): %v\n%s", err, out)
	}
	for name, cli := range map[string]*tls.Config{
		"no client certificate":        clientTLS(t, dir, "", dir),
		"PS certificate as the client": clientTLS(t, dir, "ps", dir),
		"agent of another CA":          clientTLS(t, other, "agent-a1", dir),
		"PS of another CA":             clientTLS(t, dir, "agent-a1", other),
	} {
		id, _, err := handshake(t, srv, cli)
		if err == nil {
			t.Errorf("%s: handshake succeeded as %q", name, id)
		}
		t.Logf("%s: refused: %v", name, err)
	}
}

func TestCertsCommandNeverOverwritesUnlessForced(t *testing.T) {
	dir := t.TempDir()
	if out, err := runTether(t, "certs", "ca", "--dir", dir); err != nil {
		t.Fatalf("certs ca: %v\n%s", err, out)
	}
	caBefore, _ := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if _, err := runTether(t, "certs", "ca", "--dir", dir); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second certs ca: %v", err)
	}
	args := []string{"certs", "init", "--dir", dir, "--ps-name", "ps1", "--ps-ip", "10.0.0.10", "--agent", "a1"}
	out, err := runTether(t, args...)
	if err != nil || !strings.Contains(out, "using the existing CA") {
		t.Fatalf("certs init over an existing CA: %v\n%s", err, out)
	}
	if _, err := runTether(t, args...); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("second certs init: %v", err)
	}
	if out, err := runTether(t, append(args, "--force")...); err != nil {
		t.Fatalf("certs init --force: %v\n%s", err, out)
	}
	if caAfter, _ := os.ReadFile(filepath.Join(dir, "ca-key.pem")); string(caAfter) != string(caBefore) {
		t.Fatal("certs init --force replaced the CA")
	}
	for name, perm := range map[string]os.FileMode{"ca.pem": 0o644, "ca-key.pem": 0o600, "ps1.pem": 0o644, "ps1-key.pem": 0o600, "agent-a1.pem": 0o644, "agent-a1-key.pem": 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Mode().Perm() != perm {
			t.Errorf("%s: %v, mode %v, want %o", name, err, st.Mode().Perm(), perm)
		}
	}
}

func TestCertsCommandRejectsBadFlags(t *testing.T) {
	dir := t.TempDir()
	if _, err := runTether(t, "certs", "agent", "--dir", dir, "--id", "a1"); err == nil || !strings.Contains(err.Error(), "tether certs ca --dir") {
		t.Errorf("agent without a CA: %v", err)
	}
	if out, err := runTether(t, "certs", "ca", "--dir", dir); err != nil {
		t.Fatalf("certs ca: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"certs", "ps", "--dir", dir, "--name", "ps1"}, "--ip or --dns"},
		{[]string{"certs", "ps", "--dir", dir, "--name", "ps1", "--ip", "nope"}, `--ip "nope"`},
		{[]string{"certs", "ps", "--dir", dir, "--name", "../ps1", "--ip", "10.0.0.1"}, "--name"},
		{[]string{"certs", "agent", "--dir", dir, "--id", "a b"}, "--id"},
		{[]string{"certs", "agent", "--dir", dir, "--id", "a/b"}, "--name"},
		{[]string{"certs", "agent", "--dir", dir, "--id", "a1", "--valid-for", "-1h"}, "--valid-for"},
		{[]string{"certs", "agent", "--dir", dir, "--id", "a1", "--valid-for", "100000h"}, "outlive the CA"},
		{[]string{"certs", "init", "--dir", dir, "--agent", "a1"}, "--ps-ip or --ps-dns"},
		{[]string{"certs", "init", "--dir", dir, "--ps-ip", "10.0.0.1", "--agent", "bad:id"}, "--agent"},
	} {
		_, err := runTether(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error naming %q", tc.args, err, tc.want)
		}
	}
	// Nothing but the CA was written by the refused commands.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Errorf("refused commands left files: %v", ents)
	}
	// An agent id that cannot name a file is fine with --name.
	if out, err := runTether(t, "certs", "agent", "--dir", dir, "--id", "a/b", "--name", "agent-a_b"); err != nil {
		t.Fatalf("--name: %v\n%s", err, out)
	}
	c, err := pki.ReadCert(filepath.Join(dir, "agent-a_b.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if id, err := pki.AgentIdentity(c); err != nil || id != "a/b" {
		t.Fatalf("agent-a_b.pem speaks for %q, %v", id, err)
	}
}
