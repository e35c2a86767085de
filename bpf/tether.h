/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Definitions shared by tether's BPF objects: the types of the maps, and
 * the maps both objects use. Each object is loaded with the same pin
 * directory, so both bind to the same pinned maps by name.
 */
#ifndef __TETHER_H
#define __TETHER_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define EHOSTUNREACH 113

/* Up to this many backends per route (one per PS holding the agent). */
#define MAX_BACKENDS 4

/* One byte (packed), so that it can type the state byte of the route map's
 * value in BTF: `bpftool map dump` then prints "state": "BACKEND_LIVE". */
enum backend_state {
	BACKEND_UNUSED = 0,
	BACKEND_LIVE = 1,
	BACKEND_DRAINING = 2,
	BACKEND_DEAD = 3,
} __attribute__((packed));

enum counter {
	COUNTER_REDIRECTED = 0,   /* connects rewritten to a backend */
	COUNTER_NO_ROUTE = 1,     /* TCP connects to an address without a route */
	COUNTER_NO_BACKEND = 2,   /* connects refused: the route has no live backend */
	COUNTER_PEER_REWRITTEN = 3, /* getpeername answers given the dialed address */
	COUNTER_DESTROYED = 4,    /* established sockets destroyed (dead backend) */
	COUNTER_MAX = 5,
};

/* Addresses and ports are in network byte order, as the socket sees them. */
struct route_key {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct backend {
	__be32 addr;
	__be16 port;
	__u8 state; /* enum backend_state */
	__u8 pad;
};

struct route_value {
	struct backend backends[MAX_BACKENDS];
};

/*
 * The route map's value as its BTF describes it to bpftool: the bytes of
 * struct route_value, with the state typed as enum backend_state so that a
 * dump prints the state's name. The programs read it as struct route_value,
 * whose plain __u8 keeps the generated Go type (RedirectBackend.State
 * uint8) as it was. The layout is the same, so the maps of older versions,
 * whose BTF says __u8, are reused as they are by an in-place upgrade (only
 * their dumps keep printing numbers until an uninstall and a fresh install).
 */
struct route_entry_backend {
	__be32 addr;
	__be16 port;
	enum backend_state state;
	__u8 pad;
};

struct route_entry {
	struct route_entry_backend backends[MAX_BACKENDS];
};

_Static_assert(sizeof(struct route_entry) == sizeof(struct route_value), "route_entry must keep route_value's layout");
_Static_assert(sizeof(enum backend_state) == 1, "backend_state must be one byte");

struct orig_dst {
	__be32 addr;   /* the target the application dialed */
	__be16 port;
	__u16 pad;
	__be32 backend_addr; /* the backend it was sent to */
	__be16 backend_port;
	__u16 pad2;
};

/* Force the types into BTF for bpf2go -type. */
const struct route_key *unused_route_key __attribute__((unused));
const struct route_value *unused_route_value __attribute__((unused));
const struct orig_dst *unused_orig_dst __attribute__((unused));
const enum counter *unused_counter __attribute__((unused));
const enum backend_state *unused_backend_state __attribute__((unused));


struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_orig_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	/* __u32, not enum counter: the kernel refuses BTF for an array map
	 * whose key is not an integer (array_map_check_btf), and the map
	 * would then be made without BTF at all. */
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_counters SEC(".maps");

/* Backends declared dead, whose redirected sockets iter/tcp destroys.
 * Key: backend address and port (route_key layout). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct route_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_dead SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&tether_counters, &which);
	if (v)
		*v += 1;
}

/*
 * redirected_dst, for the sockops programs (intent.c, health.c), returns
 * the socket's tether_orig_dst when connect4/6 redirected it to the backend
 * it is connecting to now. Checking the peer against the recorded backend
 * keeps a stale entry (a socket that failed to connect and was connected
 * again elsewhere) from lending its intent or marking that other peer.
 * remote_port holds the port in network order in its upper 16 bits.
 */
static __always_inline struct orig_dst *redirected_dst(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, sk, 0, 0);
	if (!od)
		return 0;
	if (skops->remote_ip4 != od->backend_addr ||
	    bpf_ntohl(skops->remote_port) != bpf_ntohs(od->backend_port))
		return 0;
	return od;
}

#endif /* __TETHER_H */
