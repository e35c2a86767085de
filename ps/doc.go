// Package ps owns the proxy server (PS) node: admission of agents' tunnels
// (credentials, the addresses an agent may expose, one session per agent
// id), port allocation with quarantine, the data plane that accepts client
// connections on those ports and carries each over the owning agent's
// tunnel, and the PS's lease and routes in the registry (publish, renew,
// resync, release, drain).
//
// It speaks the tunnel protocol through package tunnel and keeps routes in
// package registry; it must not import yamux or go-redis directly, nor any
// other role package (agent, redirector, proxy).
//
// Admission runs as small steps (admit.go): authenticate, plan the
// endpoints, allocate ports, publish, welcome, commit. The data plane sits
// behind one small interface (dataplane.go: "a connection arrived for
// local port P"), so the per-port listeners can give way to one socket
// steered by sk_lookup without the rest of the PS noticing.
package ps
