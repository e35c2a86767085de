//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_lookup: the PS's one-socket data plane. The PS listens on one socket
 * per address family and lists the (address, port) pairs it serves in
 * tether_pairs; for a TCP SYN to a listed pair this program hands the
 * connection to that family's listening socket (bpf_sk_assign), so tens of
 * thousands of idle endpoints cost map entries instead of a socket, a file
 * descriptor and an accept goroutine each. A pair not listed is left to the
 * kernel's normal lookup: with nothing bound to it, the client is refused.
 *
 * Attached to one network namespace (link.AttachNetNs) and never pinned:
 * program, maps and link die with the PS process, and the SOCKMAP entry dies
 * with its socket anyway, so a crashed PS leaves no steering behind.
 * Does not include tether.h: the redirector's pinned maps are no business
 * of the PS.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

/*
 * A steered pair. addr is an IPv6 address in network byte order; an IPv4
 * address is stored v4-mapped (::ffff:a.b.c.d), as Go's netip.Addr.As16
 * gives it. port is in host byte order, as the sk_lookup context has it.
 */
struct steer_key {
	__be32 addr[4];
	__u16 port;
	__u16 pad;
};

/* Index in tether_socks of the listener that takes a family's lookups. */
enum steer_socket {
	STEER_SOCKET_IPV4 = 0,
	STEER_SOCKET_IPV6 = 1,
	STEER_SOCKET_MAX = 2,
};

enum steer_counter {
	STEER_STEERED = 0,       /* SYNs handed to the PS's listener */
	STEER_ASSIGN_FAILED = 1, /* listed pairs whose listener was missing or refused the assign */
	STEER_COUNTER_MAX = 2,
};

const struct steer_key *unused_steer_key __attribute__((unused));
const enum steer_counter *unused_steer_counter __attribute__((unused));
const enum steer_socket *unused_steer_socket __attribute__((unused));

/* The pairs the PS serves -> enum steer_socket. max_entries is set by the
 * PS before load (its capacity); not preallocated, so an unused capacity
 * costs no kernel memory. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct steer_key);
	__type(value, __u32);
} tether_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, STEER_SOCKET_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tether_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tether_steer_ct SEC(".maps");

static __always_inline void steer_count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&tether_steer_ct, &which);
	if (v)
		*v += 1;
}

SEC("sk_lookup")
int tether_steer(struct bpf_sk_lookup *ctx)
{
	struct steer_key key = {};

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* Each load stays in its branch (barrier_var): clang would otherwise
	 * merge the two loads of addr[3] into one through a computed ctx
	 * pointer, which the verifier refuses ("dereference of modified ctx
	 * ptr"). */
	if (ctx->family == AF_INET) {
		__u32 ip4 = ctx->local_ip4;
		barrier_var(ip4);
		key.addr[2] = bpf_htonl(0xffff);
		key.addr[3] = ip4;
	} else if (ctx->family == AF_INET6) {
		__u32 ip6_3 = ctx->local_ip6[3];
		barrier_var(ip6_3);
		key.addr[0] = ctx->local_ip6[0];
		key.addr[1] = ctx->local_ip6[1];
		key.addr[2] = ctx->local_ip6[2];
		key.addr[3] = ip6_3;
	} else {
		return SK_PASS;
	}
	key.port = (__u16)ctx->local_port;

	__u32 *slot = bpf_map_lookup_elem(&tether_pairs, &key);
	if (!slot)
		return SK_PASS;
	struct bpf_sock *sk = bpf_map_lookup_elem(&tether_socks, slot);
	if (!sk) {
		/* The listener is gone (the PS is closing): the normal lookup
		 * refuses the connection. */
		steer_count(STEER_ASSIGN_FAILED);
		return SK_PASS;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	steer_count(err ? STEER_ASSIGN_FAILED : STEER_STEERED);
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
