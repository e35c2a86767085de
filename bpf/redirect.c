//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tether's socket-level redirect.
 *
 * cgroup/connect4 and cgroup/connect6 rewrite connect(target) to a live PS
 * backend of the target's route; cgroup/getpeername4/6 give the application
 * back the address it dialed. The original destination is kept per socket in
 * socket-local storage, so it lives and dies with the socket (no LRU to evict
 * it early). iter/tcp destroys established sockets that were redirected to a
 * backend user space declared dead.
 */
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

enum backend_state {
	BACKEND_UNUSED = 0,
	BACKEND_LIVE = 1,
	BACKEND_DRAINING = 2,
	BACKEND_DEAD = 3,
};

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
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1000000); /* set on the MapSpec before load */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, struct route_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_routes SEC(".maps");

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
 * redirect looks the target up and, when it has a route, picks a live
 * backend. It returns 1 to let connect() go on (rewritten or untouched) and
 * 0 to fail it with EHOSTUNREACH.
 */
static __always_inline int redirect(struct bpf_sock_addr *ctx, __be32 addr, __be16 port,
				    __be32 *new_addr, __be16 *new_port)
{
	struct route_key key = { .addr = addr, .port = port };
	struct route_value *rv = bpf_map_lookup_elem(&tether_routes, &key);
	if (!rv) {
		count(COUNTER_NO_ROUTE);
		return -1;
	}

	__u32 live = 0;
#pragma unroll
	for (int i = 0; i < MAX_BACKENDS; i++)
		if (rv->backends[i].state == BACKEND_LIVE)
			live++;
	if (live == 0) {
		count(COUNTER_NO_BACKEND);
		return 0;
	}

	/* Spread new connections over the live backends. */
	__u32 pick = bpf_get_prandom_u32() % live;
	__u32 seen = 0;
	struct backend chosen = {};
#pragma unroll
	for (int i = 0; i < MAX_BACKENDS; i++) {
		if (rv->backends[i].state != BACKEND_LIVE)
			continue;
		if (seen == pick) {
			chosen = rv->backends[i];
			break;
		}
		seen++;
	}
	if (chosen.state != BACKEND_LIVE) {
		/* The map changed under us; treat it as no live backend. */
		count(COUNTER_NO_BACKEND);
		return 0;
	}

	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (od) {
		od->addr = addr;
		od->port = port;
		od->backend_addr = chosen.addr;
		od->backend_port = chosen.port;
	}
	*new_addr = chosen.addr;
	*new_port = chosen.port;
	count(COUNTER_REDIRECTED);
	return 1;
}

SEC("cgroup/connect4")
int tether_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__be32 addr = 0;
	__be16 port = 0;
	int r = redirect(ctx, ctx->user_ip4, (__be16)ctx->user_port, &addr, &port);
	if (r < 0)
		return 1;
	if (r == 0) {
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	ctx->user_ip4 = addr;
	ctx->user_port = (__u32)port;
	return 1;
}

/* Dual-stack sockets (JDK, Go, Python AF_INET6) dial IPv4 targets as
 * IPv4-mapped IPv6 addresses, ::ffff:a.b.c.d. */
SEC("cgroup/connect6")
int tether_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	__be32 addr = 0;
	__be16 port = 0;
	int r = redirect(ctx, ctx->user_ip6[3], (__be16)ctx->user_port, &addr, &port);
	if (r < 0)
		return 1;
	if (r == 0) {
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	ctx->user_ip6[3] = addr;
	ctx->user_port = (__u32)port;
	return 1;
}

SEC("cgroup/getpeername4")
int tether_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, ctx->sk, 0, 0);
	if (!od)
		return 1;
	ctx->user_ip4 = od->addr;
	ctx->user_port = (__u32)od->port;
	count(COUNTER_PEER_REWRITTEN);
	return 1;
}

SEC("cgroup/getpeername6")
int tether_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, ctx->sk, 0, 0);
	if (!od)
		return 1;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
	ctx->user_ip6[3] = od->addr;
	ctx->user_port = (__u32)od->port;
	count(COUNTER_PEER_REWRITTEN);
	return 1;
}

/* ---- Destroying sockets of dead backends (kernel >= 6.5) ---------------- */

/* Minimal CO-RE views of kernel types; field offsets are relocated against
 * the running kernel's BTF at load time, so no vmlinux.h is needed. */
struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct tcp_sock;

struct bpf_iter_meta;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

SEC("iter/tcp")
int tether_destroy(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	if (skc->skc_family != AF_INET && skc->skc_family != AF_INET6)
		return 0;
	struct route_key key = { .addr = skc->skc_daddr, .port = skc->skc_dport };
	if (!bpf_map_lookup_elem(&tether_dead, &key))
		return 0;
	/* Only sockets this program redirected carry our storage: never touch
	 * a socket of another cgroup that happens to talk to the same PS. */
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, (struct sock *)tp, 0, 0);
	if (!od)
		return 0;
	if (bpf_sock_destroy(skc) == 0)
		count(COUNTER_DESTROYED);
	return 0;
}

char __license[] SEC("license") = "Dual BSD/GPL";
