// Package registry owns the Redis layout of routes, the proxy servers'
// leases, the change feed, and the in-memory mirror that readers keep of it.
// It is the only package that imports go-redis.
//
// # Model
//
// A route maps a target (an agent's ip:port) to up to one backend per proxy
// server (PS): the PS address and port assigned to that target, and the
// agent that exposes it. A PS may advertise several addresses
// (PSLease.Addrs) and allocates its ports across all of them, so a PS port
// is an (address, port) pair everywhere: in route entries, in the PS's port
// index and in its quarantine. Leases are per PS: a PS renews one lease for itself, and every
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
//	{P}:ps:<ps_id>          HASH   addr (the primary address), addrs (every advertised address,
//	                               space-separated, addr first), expires_ms, state (active|draining),
//	                               renewed_ms, nonce (the holding instance)
//	                               (both times unix ms on Redis's clock)
//	{P}:pses                SET    ids of all PS nodes that have a ps key
//	{P}:route:<ip:port>     HASH   field <ps_id> -> JSON {"port":N,"agent_id":"...","owner":"...","addr":"<PS ip>"}
//	                               (owner absent when there is none; addr is the PS address the
//	                               port was assigned on, Publication.Addr or else the lease's addr)
//	{P}:targets             SET    every target that has at least one backend
//	{P}:psroutes:<ps_id>    HASH   field <PS ip:port> -> target: the PS's ports in use
//	{P}:quarantine:<ps_id>  ZSET   member <PS ip:port>, score = unix ms (Redis's clock)
//	                               until it may be reused
//	{P}:changes             STREAM entries {k: route|ps, id: <target>|<ps_id>},
//	                               trimmed to about Config.StreamMaxLen entries
//	{P}:generation          STRING random id, SET NX by every PS lease write: it
//	                               changes only when the registry lost its data
//
// A PS ip:port is written as netip.AddrPort.String writes it: 127.0.0.2:20001,
// [fd00::1]:20001. Older versions, which had one address per PS, wrote a
// bare port (20001) in psroutes and quarantine; both formats are read,
// withdrawn and honoured:
//   - a bare psroutes field is read as the address of the PS's route entry
//     for its target when that entry has the port and an address, else as
//     the lease's primary addr (PortsInUse, WithdrawAll); a publication
//     that takes the target over, and a withdrawal of the pair, remove it;
//   - a bare quarantine member quarantines the port on every address of the
//     lease (Quarantined): too much quarantine is safe, too little never is.
//     A withdrawal whose address nobody knows (no entry address, no lease)
//     writes a bare member too.
//
// A reader places an entry on entry.addr:port when entry.addr is one of its
// PS lease's Addrs, and on the lease's addr:port when the entry has no
// addr (an older writer). An entry whose addr the lease does not advertise
// was published by an earlier instance of the id at other addresses: it is
// stale, and Get, List and the Mirror leave it out.
//
// A <ps_id> has the syntax of internal/ident (printable ASCII without
// blanks, braces or colons), so it can neither reach into another key's
// name nor change the hash tag.
//
// A change entry says only which key changed; readers re-read that key, so
// replaying an entry twice, or out of order with a snapshot, is harmless.
// Writers add one entry per route key they change, and trim the stream
// once per script call.
//
// # Registration at scale
//
// Publish sends batches of batchSize publications, one script call each:
// Redis runs one script at a time, so a batch bounds how long another PS's
// small registration waits behind a huge one (about 2 ms). The script
// judges the whole batch before writing, then writes the port index and
// the set of targets (one command each), then the entries and their change
// entries; a batch never names a target twice (Publish starts a new batch
// at a repeated one). TestPublishAtScale measures it.
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
