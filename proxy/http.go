package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Bounds on what an HTTP client may make the proxy hold.
const (
	// maxHeaderBytes bounds a request's header block.
	maxHeaderBytes = 16 << 10
	// readHeaderTimeout bounds the wait for a request's header block.
	readHeaderTimeout = 10 * time.Second
	// idleTimeout closes a keep-alive connection left idle between
	// requests (CONNECT tunnels are hijacked and not bound by it).
	idleTimeout = 2 * time.Minute
)

func (p *Proxy) serveHTTP(ctx context.Context, ln net.Listener) error {
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			targets, err := p.targetsOf(ctx, addr)
			if err != nil {
				return nil, err
			}
			c, _, err := p.dial(ctx, targets)
			return c, err
		},
		MaxIdleConnsPerHost:   4,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}
	defer transport.CloseIdleConnections()
	forward := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL = r.In.URL
			r.Out.Host = r.In.Host
			r.Out.Header.Del("Proxy-Authorization")
		},
		Transport: transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			status, result := httpStatus(err)
			p.metrics.requests.WithLabelValues("http", result).Inc()
			p.log.Info("http proxy request failed", "client", r.RemoteAddr, "target", r.URL.Host, "err", err)
			http.Error(w, "tether proxy: "+err.Error(), status)
		},
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !p.authorized(r) {
				p.metrics.requests.WithLabelValues("http", "unauthorized").Inc()
				w.Header().Set("Proxy-Authenticate", `Basic realm="tether"`)
				http.Error(w, "tether proxy: proxy authentication required", http.StatusProxyAuthRequired)
				return
			}
			switch {
			case r.Method == http.MethodConnect:
				r, done := outliveHalfClose(ctx, r)
				defer done()
				p.handleConnect(w, r)
			case r.URL.IsAbs() && r.URL.Scheme == "http":
				p.metrics.requests.WithLabelValues("http", "forwarded").Inc()
				r, done := outliveHalfClose(ctx, r)
				defer done()
				forward.ServeHTTP(w, r)
			default:
				// Origin-form ("GET /"), "OPTIONS *", https:// URLs: the
				// proxy serves no resource of its own.
				p.metrics.requests.WithLabelValues("http", "bad_request").Inc()
				http.Error(w, "tether proxy: want CONNECT host:port or an absolute http:// URL", http.StatusBadRequest)
			}
		}),
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// net/http answers "OPTIONS *" itself with 200 unless told not to:
		// the handler refuses it like any request that names no target.
		DisableGeneralOptionsHandler: true,
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("http proxy: %w", err)
	}
	return nil
}

// outliveHalfClose returns r with a context that a client's half-close does
// not cancel. net/http cancels a request's context as soon as a read from
// its client hits EOF, but a client may shut its write side once the
// request is sent (printf ... | nc -N) and still wait for the answer. The
// new context ends when done is called (the handler returns) or the proxy
// stops; a client gone for good is noticed when a write to it fails, and
// the wait before that is bounded by the dial timeout and the transport's
// ResponseHeaderTimeout.
func outliveHalfClose(run context.Context, r *http.Request) (*http.Request, func()) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	stop := context.AfterFunc(run, cancel)
	return r.WithContext(ctx), func() { stop(); cancel() }
}

// targetsOf resolves "host:port".
func (p *Proxy) targetsOf(ctx context.Context, hostport string) ([]netip.AddrPort, error) {
	host, ps, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, fmt.Errorf("target %q: %w", hostport, err)
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || port == 0 {
		return nil, fmt.Errorf("target %q: bad port", hostport)
	}
	return resolve(ctx, host, uint16(port))
}

func (p *Proxy) authorized(r *http.Request) bool {
	if p.users == nil {
		return true
	}
	h := r.Header.Get("Proxy-Authorization")
	raw, ok := strings.CutPrefix(h, "Basic ")
	if !ok {
		return false
	}
	dec, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return false
	}
	u, pw, ok := strings.Cut(string(dec), ":")
	return ok && p.checkUser(u, pw)
}

func (p *Proxy) handleConnect(w http.ResponseWriter, r *http.Request) {
	targets, err := p.targetsOf(r.Context(), r.Host)
	var up net.Conn
	if err == nil {
		up, _, err = p.dial(r.Context(), targets)
	}
	if err != nil {
		status, result := httpStatus(err)
		p.metrics.requests.WithLabelValues("http_connect", result).Inc()
		p.log.Info("http CONNECT failed", "client", r.RemoteAddr, "target", r.Host, "err", err)
		http.Error(w, "tether proxy: "+err.Error(), status)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		up.Close()
		http.Error(w, "tether proxy: CONNECT needs HTTP/1.1", http.StatusHTTPVersionNotSupported)
		return
	}
	c, buf, err := hj.Hijack()
	if err != nil {
		up.Close()
		return
	}
	p.metrics.requests.WithLabelValues("http_connect", "ok").Inc()
	// A tunnel lives as long as its client wants: no deadline the HTTP
	// server may have left on the connection applies to it.
	_ = c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n")); err != nil {
		c.Close()
		up.Close()
		return
	}
	p.splice(c, up, buf.Reader)
}

// httpStatus maps a dial error to a status and a metrics label.
func httpStatus(err error) (int, string) {
	switch {
	case errors.Is(err, ErrNoRoute):
		return http.StatusForbidden, "no_route"
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, "passthrough_forbidden"
	case errors.Is(err, ErrNoLiveBackend):
		return http.StatusServiceUnavailable, "unreachable"
	case errors.Is(err, ErrResolve):
		return http.StatusBadGateway, "unreachable"
	case errors.Is(err, ErrRefused):
		return http.StatusBadGateway, "refused"
	}
	return http.StatusBadGateway, "error"
}
