// Package bpf owns tether's eBPF programs and the Go bindings bpf2go
// generates from them. redirect.c: cgroup/connect4 and connect6 rewrite a
// connect() to a target with a route to a live PS backend; getpeername4/6
// give the application the address it dialed. destroy.c: iter/tcp destroys
// sockets redirected to a backend declared dead (it needs a kfunc of Linux
// >= 6.5, so it is an object of its own and the redirect loads without it).
// health.c: sockops passive health, marking backends whose redirected
// connects are refused or get no SYN-ACK (health.h holds the maps it shares
// with redirect.c). sklookup.c: the PS's one-socket data plane, an
// sk_lookup program that hands a TCP connection to an open (address, port)
// pair to the PS's listener of that family. tether.h holds what the
// redirector's programs share. The generated objects are committed, so
// building tether needs no clang; `make generate` rebuilds them with clang 14
// (pinned in gen.go, so that they regenerate byte for byte).
//
// Maps, all pinned by name under the redirector's pin directory and printed
// readably by `bpftool map dump pinned <dir>/<map>` (they carry BTF):
//
//	tether_routes    HASH        route_key{addr, port} -> route_value{backends[4]{addr, port, state}}
//	tether_orig_dst  SK_STORAGE  per socket: the dialed target and the backend chosen
//	tether_counters  PERCPU_ARRAY counters, indexed by enum counter
//	tether_dead      HASH        backend route_key -> 1, for the socket destroyer
//	tether_suspect   LRU_HASH    backend route_key -> ktime ns of its last failed connect
//	tether_health_config   ARRAY         passive health settings (slot 0: hold-down ns, 0 = off)
//	tether_health_counters PERCPU_ARRAY  passive health counters, indexed by enum health_counter
//
// Addresses and ports in the maps are in network byte order.
//
// The PS's maps are never pinned: they, the program and its network
// namespace link live exactly as long as the PS process (a restarted PS
// leaves no steering behind):
//
//	tether_pairs     HASH        steer_key{addr[16] (IPv4 v4-mapped), port (host order)} -> listener slot
//	tether_socks     SOCKMAP     slot 0: the IPv4 listener, 1: the IPv6 listener
//	tether_steer_ct  PERCPU_ARRAY steered, assign_failed
package bpf
