// Package redirector owns the client-host side of tether: it loads the eBPF
// programs of package bpf, attaches them to a cgroup, pins maps and links
// under a bpffs directory (so a restart or upgrade never stops redirection),
// and mirrors the route registry into the route map: a full load, then the
// change feed, local lease expiry and periodic anti-entropy (registry.Mirror),
// applied by a Reconciler through the small RouteMap interface.
//
// It acts only where it is told to: the cgroup is required (the root of the
// cgroup2 mount, every process of the host, only when named), only targets
// the operator's --target-cidrs allow enter the map (loopback, link-local and
// the other special ranges only when named, see cidr.List.Permits), and the
// redirector's own sockets are never redirected (Installation.MarkOwnSocket).
//
// When a backend dies, the client sockets that were redirected to it are
// destroyed (iter/tcp with bpf_sock_destroy), so applications see an error
// within seconds and reconnect to a live backend instead of hanging.
package redirector
