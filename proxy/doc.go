// Package proxy owns tether's fallback for clients that cannot run eBPF: a
// SOCKS5 server (RFC 1928, with RFC 1929 username/password) and an HTTP proxy
// (CONNECT tunnels and plain absolute-URL forwarding) that look targets up in
// the same in-memory route table the redirector keeps (registry.Mirror) and
// dial one of their live PS backends, trying the other if the first refuses.
// It also owns the proxy's safe defaults: no listener beyond loopback without
// --auth-file or --allow-clients, and a --passthrough that never reaches the
// proxy host itself (passthrough.go).
package proxy
