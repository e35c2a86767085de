package bpf

// The committed objects are built by clang 14: another clang emits other
// bytes, and `make check-generated` (CI) would call them stale. So the
// compiler is pinned here by name (bpf2go then strips with llvm-strip-14),
// and a host without it stops with a message that says so.
//go:generate sh -c "command -v clang-14 >/dev/null || { echo 'go generate ./bpf: clang-14 not found; the committed eBPF objects are built with clang 14 (Debian/Ubuntu: apt install clang-14 llvm-14)' >&2; exit 1; }"
//go:generate -command bpf2go go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -nostdinc -Iinclude" -target bpfel
//go:generate bpf2go -type route_key -type route_value -type backend -type orig_dst -type counter -type backend_state Redirect redirect.c
//go:generate bpf2go Destroy destroy.c
//go:generate bpf2go -type intent_counter Intent intent.c
//go:generate bpf2go -type health_counter -type health_config_slot Health health.c
//go:generate bpf2go -type steer_key -type steer_counter -type steer_socket Sklookup sklookup.c
