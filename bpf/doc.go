// Package bpf owns tether's eBPF programs (redirect.c) and the Go bindings
// bpf2go generates from them: cgroup/connect4 and connect6 rewrite a
// connect() to a target with a route to a live PS backend; getpeername4/6
// give the application the address it dialed; iter/tcp destroys sockets
// redirected to a backend declared dead. The generated objects are committed,
// so building tether needs no clang; `make generate` rebuilds them.
//
// Maps, all pinned by name under the redirector's pin directory and printed
// readably by `bpftool map dump pinned <dir>/<map>` (they carry BTF):
//
//	tether_routes    HASH        route_key{addr, port} -> route_value{backends[4]{addr, port, state}}
//	tether_orig_dst  SK_STORAGE  per socket: the dialed target and the backend chosen
//	tether_counters  PERCPU_ARRAY counters, indexed by enum counter
//	tether_dead      HASH        backend route_key -> 1, for the socket destroyer
//
// Addresses and ports in the maps are in network byte order.
package bpf
