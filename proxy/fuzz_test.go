package proxy

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

func FuzzSOCKSRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 77, 0, 1, 0x23, 0x8c})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 9, 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't', 0, 80})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 2, 0, 2, 1, 3, 'o', 'p', 's', 1, 'x'})
	f.Add([]byte{4, 1, 0, 80})
	f.Add([]byte{5, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		methods, err := readGreeting(r)
		if err != nil {
			return
		}
		if len(methods) == 0 {
			t.Fatal("a greeting without methods was accepted")
		}
		if bytes.IndexByte(methods, methodUserPass) >= 0 {
			_, _, _ = readUserPass(r)
		}
		req, err := readRequest(r)
		if err != nil {
			return
		}
		if req.host == "" {
			t.Fatalf("a request without a host was accepted: %+v", req)
		}
	})
}

func FuzzHTTPRequest(f *testing.F) {
	f.Add([]byte("GET http://127.77.0.1:9100/ HTTP/1.1\r\nHost: 127.77.0.1:9100\r\n\r\n"))
	f.Add([]byte("CONNECT 127.77.0.1:9100 HTTP/1.1\r\nHost: 127.77.0.1:9100\r\nProxy-Authorization: Basic b3BzOnMzY3JldA==\r\n\r\n"))
	f.Add([]byte("CONNECT [::1]:0 HTTP/1.1\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	p, err := newWithLookup(Config{DialTimeout: 1}, nil)
	if err != nil {
		f.Fatal(err)
	}
	p.users = map[string]string{"ops": "s3cret"}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		_ = p.authorized(req)
		// Only IP literals: a name would make the fuzzer hit the resolver.
		host, _, err := net.SplitHostPort(req.Host)
		if err != nil {
			return
		}
		if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err != nil {
			return
		}
		if targets, err := p.targetsOf(context.Background(), req.Host); err == nil {
			for _, t2 := range targets {
				if !t2.IsValid() || t2.Port() == 0 {
					t.Fatalf("invalid target %v from %q", t2, req.Host)
				}
			}
		}
	})
}
