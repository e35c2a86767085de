package proxy

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// TestHTTPClientsGetTheDocumentedStatus sends each kind of HTTP proxy
// request and checks the exact status, that the proxy says why, that it
// closes the connection when the client is done (no hang), and that only a
// routed target reaches the upstream.
func TestHTTPClientsGetTheDocumentedStatus(t *testing.T) {
	const creds = "Proxy-Authorization: Basic b3BzOnMzY3JldA==\r\n" // ops:s3cret
	get := func(hostport string) string {
		return fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport)
	}
	connect := func(hostport string) string {
		return fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport)
	}
	users := map[string]string{"ops": "s3cret"}
	cases := []struct {
		name   string
		users  map[string]string
		in     string
		status int
	}{
		{"origin-form request", nil, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest},
		{"https:// URL without CONNECT", nil, "GET https://127.77.0.1:9100/ HTTP/1.1\r\nHost: 127.77.0.1:9100\r\n\r\n", http.StatusBadRequest},
		{"forward to a target without a route", nil, get(unroutedTarget.String()), http.StatusForbidden},
		{"CONNECT to a target without a route", nil, connect(unroutedTarget.String()), http.StatusForbidden},
		{"forward to a draining target", nil, get(drainingTarget.String()), http.StatusServiceUnavailable},
		{"CONNECT to a draining target", nil, connect(drainingTarget.String()), http.StatusServiceUnavailable},
		{"forward to a refusing backend", nil, get(refusedTarget.String()), http.StatusBadGateway},
		{"CONNECT to a refusing backend", nil, connect(refusedTarget.String()), http.StatusBadGateway},
		{"CONNECT to port 0", nil, connect("127.77.0.1:0"), http.StatusBadGateway},
		{"CONNECT to a name that does not resolve", nil, connect("nowhere.test:80"), http.StatusBadGateway},
		{"CONNECT to a name without a route", nil, connect("localhost:9100"), http.StatusForbidden},
		{"forward to a routed target", nil, get(routedTarget.String()), http.StatusOK},
		{"CONNECT to a routed target", nil, connect(routedTarget.String()), http.StatusOK},
		{"CONNECT to a routed IPv6 target", nil, connect(routedTarget6.String()), http.StatusOK},
		{"no credentials", users, get(routedTarget.String()), http.StatusProxyAuthRequired},
		{"wrong credentials", users, strings.Replace(connect(routedTarget.String()), "\r\n\r\n", "\r\nProxy-Authorization: Basic b3BzOndyb25n\r\n\r\n", 1), http.StatusProxyAuthRequired},
		{"right credentials", users, strings.Replace(connect(routedTarget.String()), "\r\n\r\n", "\r\n"+creds+"\r\n", 1), http.StatusOK},
		{"oversized header", nil, strings.Replace(get(routedTarget.String()), "\r\n\r\n", "\r\nX-Big: "+strings.Repeat("a", 64<<10)+"\r\n\r\n", 1), http.StatusRequestHeaderFieldsTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tp := newTestProxy(t, c.users)
			tp.startHTTP(t)
			run := runHTTP(t, tp, []byte(c.in))
			if run.err != nil {
				t.Fatalf("no answer and close within 5s: %v (got %q)", run.err, run.raw)
			}
			if run.resp == nil || run.resp.StatusCode != c.status {
				t.Fatalf("want status %d, got %q", c.status, run.raw)
			}
			wantContacts := int64(0)
			switch {
			case c.status == http.StatusOK:
				wantContacts = 1
				if !strings.HasSuffix(run.body, "upstream\n") {
					t.Errorf("a 200 without the upstream's bytes: %q", run.raw)
				}
			case c.status == http.StatusProxyAuthRequired:
				if got := run.resp.Header.Get("Proxy-Authenticate"); got != `Basic realm="tether"` {
					t.Errorf("407 with Proxy-Authenticate %q", got)
				}
				fallthrough
			case c.status != http.StatusRequestHeaderFieldsTooLarge:
				if !strings.HasPrefix(run.body, "tether proxy: ") {
					t.Errorf("a refusal that does not say it is the proxy's: %q", run.body)
				}
			}
			if run.contacts != wantContacts {
				t.Errorf("the upstream got %d connections, want %d", run.contacts, wantContacts)
			}
		})
	}
}
