// Package tunnel owns the wire protocol between agents and proxy servers
// and the session layer on top of it: the handshake codecs (Hello,
// Welcome, Refuse) and their framing, the stream header and status, the
// yamux configuration both ends share, TLS setup, and the two ends of an
// established session (AgentSession, PSSession). SPEC.md describes the
// protocol byte by byte.
//
// It is the only package that imports hashicorp/yamux. It must not import
// the registry, configuration (internal/cliconfig) or any role package:
// what a PS or an agent does with a session is theirs, so the protocol can
// be tested over a pipe, TCP and TLS on its own.
//
// An agent dials a PS and calls Handshake; the PS reads the Hello with
// ReadHello, answers with WriteWelcome or WriteRefuse, and starts its end
// with NewPSSession. The PS then opens one stream per client connection,
// which the agent accepts, checks and joins to its local target.
package tunnel
