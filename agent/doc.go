// Package agent owns the agent daemon: its configuration, the placement of
// its tunnels on distinct proxy servers, reconnecting with jittered
// backoff, and dialing the local targets of the streams it receives.
//
// The agent holds Config.Tunnels tunnels (default two), each on a
// different PS, and exposes the same endpoints through each, so that every
// route has a backend on two PS nodes (docs/DESIGN.md, invariant 2). Every stream
// it receives names its target; the agent serves only targets it exposes
// (docs/DESIGN.md, invariant 1).
package agent
