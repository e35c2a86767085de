// Package tunnel owns the wire protocol between agents and proxy servers
// (the handshake, the stream header and status, over hashicorp/yamux; see
// SPEC.md) and the proxy server (PS) node: its tunnel listener, port
// allocation, data listeners and route leases. It is the only package that
// imports yamux.
//
// An agent dials the PS and calls Handshake; the PS (a PS value, run with
// Run) answers with the port it assigned to each endpoint, listens on those
// ports, and opens one stream per client connection, which the agent
// accepts, checks and joins to its local target.
package tunnel
