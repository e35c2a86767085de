//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * iter/tcp: destroy established sockets that were redirected to a backend
 * user space declared dead (listed in tether_dead), so clients see an error
 * at once instead of hanging on a PS that vanished without a RST. Needs the
 * bpf_sock_destroy kfunc (Linux >= 6.5); on older kernels this object fails
 * to load and the redirector falls back to netlink SOCK_DESTROY.
 */
#include "tether.h"

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
