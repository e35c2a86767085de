// Package redirector owns the client-host side of tether: it loads the eBPF
// programs of package bpf, attaches them to a cgroup, pins maps and links
// under a bpffs directory (so a restart or upgrade never stops redirection),
// and mirrors the route registry into the route map: a full load, then the
// change feed, local lease expiry and periodic anti-entropy (registry.Mirror),
// applied by a Reconciler through the small RouteMap interface.
//
// When a backend dies, the client sockets that were redirected to it are
// destroyed (iter/tcp with bpf_sock_destroy), so applications see an error
// within seconds and reconnect to a live backend instead of hanging.
package redirector
