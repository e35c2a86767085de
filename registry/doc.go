// Package registry owns the Redis layout of routes, the proxy servers'
// leases, the change feed, and the in-memory mirror that readers keep of it.
// It is the only package that imports go-redis.
//
// # Model
//
// A route maps a target (an agent's ip:port) to up to one backend per proxy
// server (PS): the port the PS listens on for that target and the agent that
// exposes it. Leases are per PS: a PS renews one lease for itself, and every
// backend it published lives exactly as long as that lease. A backend whose
// PS lease has lapsed, or whose PS is draining, is not live; Get, List and
// the Mirror never hand out a dead backend as live, even before anything
// deletes it.
//
// # One clock
//
// Lease expiry is judged on Redis's clock (TIME), never by comparing two
// hosts' wall clocks. A PS sends how long its lease lasts; the script that
// renews it stores Redis's now plus that. Every script that judges expiry
// (publish) reads TIME itself. A reader reads TIME in the same script as
// the leases and keeps, per lease, its own time at sending the read plus
// the time Redis had left: PSLease.ExpiresAt and Backend.ExpiresAt are on
// the reader's clock (with its monotonic reading), so a Mirror expires
// leases locally without ever trusting the PS's
// clock or assuming its own agrees with Redis's. Port quarantines are
// written by one process and judged by another (a peer collects a dead PS;
// the PS, restarted, reads the quarantine back), so they are kept on Redis's
// clock the same way.
//
// # Owners
//
// A backend records the credential its agent authenticated with (an
// opaque Publication.Owner such as "tok:3f2a9c1b" or "cert:a1"). Publish
// refuses, with a ConflictError, a target held live on another PS by
// another agent, or by the same agent id under another non-empty owner. An
// entry without an owner (an --insecure PS, or one written by an older
// version) never refuses on the owner's ground. On its own PS a newer
// session of an agent replaces the older one: that is the PS's decision.
//
// # Key layout
//
// Every key shares the hash tag {P}, where P is Config.Prefix (default
// "tether"), so the Lua scripts that touch several keys work on a single
// server, under Sentinel and on a Cluster alike (all keys live in one slot).
//
//	{P}:ps:<ps_id>          HASH   addr, expires_ms, state (active|draining), renewed_ms, nonce (the holding instance)
//	                               (both times unix ms on Redis's clock)
//	{P}:pses                SET    ids of all PS nodes that have a ps key
//	{P}:route:<ip:port>     HASH   field <ps_id> -> JSON {"port":N,"agent_id":"...","owner":"...","addr":"<PS ip at publish>"}
//	                               (owner absent when there is none)
//	{P}:targets             SET    every target that has at least one backend
//	{P}:psroutes:<ps_id>    HASH   field <port> -> target: the PS's ports in use
//	{P}:quarantine:<ps_id>  ZSET   member <port>, score = unix ms (Redis's clock)
//	                               until it may be reused
//	{P}:changes             STREAM entries {k: route|ps, id: <target>|<ps_id>},
//	                               trimmed to about Config.StreamMaxLen entries
//	{P}:generation          STRING random id, SET NX by every PS lease write: it
//	                               changes only when the registry lost its data
//
// A <ps_id> has the syntax of internal/ident (printable ASCII without
// blanks, braces or colons), so it can neither reach into another key's
// name nor change the hash tag.
//
// A change entry says only which key changed; readers re-read that key, so
// replaying an entry twice, or out of order with a snapshot, is harmless.
//
// # Writers
//
// A PS renews its lease (RenewPS) and publishes its backends (Publish). It
// gives ports up with Release, which quarantines them before it withdraws
// them, in one script per batch: the PS does not hand a port to another
// target before the quarantine ends, while some reader may still map it to
// the old one, and no failure can leave a withdrawn port unquarantined.
// Any PS collects the backends of dead PS nodes the same way (CollectDead).
//
// # Readers
//
// A Mirror loads a full snapshot, follows the change stream from the
// snapshot's cursor, expires backends locally when their PS lease lapses,
// and repairs itself with a full snapshot every Resync. A reader whose
// cursor has been trimmed away reloads in full.
//
// Leases are judged on a clock that advances only while the mirror can see
// the registry: an outage of any length kills no backend, and expiry
// resumes where it stopped when Redis returns (see leaseJudge). A data loss
// (the generation changed, or the stream was reset) opens a repair window
// in which the mirror merges what it reads and removes nothing for being
// absent, while the PS nodes, told by their next renewal (RenewPS returns
// ErrRegistryDataLost), republish every route; a full load follows.
//
// # Go programs as clients
//
// A Go program that prefers to resolve routes itself, instead of relying on
// the eBPF redirector or the SOCKS5/HTTP proxy, uses this package directly:
// Registry.Get for a one-off lookup (only live backends come back), or a
// Mirror for a program that dials often (lookups are memory reads, and a
// Sink, if given, is told of every change). See the examples.
package registry
