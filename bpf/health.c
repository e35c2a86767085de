//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: passive health. A redirected connect (one with a
 * tether_orig_dst entry naming the backend it is connecting to) that fails
 * marks its backend suspect in tether_suspect, and connect4/6 (redirect.c)
 * avoid suspect backends for the hold-down while another usable backend is
 * unmarked. One failed connect on this host thus steers the next ones away
 * from a dead PS before any control-plane message arrives.
 *
 * A connect fails when:
 *   - SYN_SENT -> CLOSE with sk_err set: ECONNREFUSED is a RST to the SYN
 *     (HEALTH_MARKED_REFUSED); any other error (ETIMEDOUT after the last
 *     SYN retransmit, EHOSTUNREACH from ICMP) is HEALTH_MARKED_TIMEOUT.
 *     SYN_SENT -> CLOSE with sk_err 0 is the application closing its own
 *     pending connect (its connect timeout, a cancelled happy-eyeballs
 *     attempt): that says nothing about the backend and marks nothing.
 *   - an RTO fires in SYN_SENT: no SYN-ACK within the initial RTO (about
 *     1 s), HEALTH_MARKED_TIMEOUT. Each retransmit refreshes the mark.
 * A connect that reaches ESTABLISHED clears its backend's mark.
 *
 * Attached to the same cgroup as intent.c's sockops program: both run for
 * every socket, so each only ever ORs its callback flags in or masks its
 * own out, never overwrites the other's.
 */
#include "health.h"

#define ECONNREFUSED 111

/* sk_err is not in bpf_sock_ops: read it from the kernel's struct sock
 * through bpf_skc_to_tcp_sock, with a CO-RE view relocated against the
 * running kernel's BTF at load time. */
struct sock {
	int sk_err;
} __attribute__((preserve_access_index));

struct tcp_sock;

#define HEALTH_CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG)

/*
 * redirected_backend fills key with the backend this socket was redirected
 * to, when connect4/6 redirected it and it still connects to that backend
 * (a socket whose redirected connect failed may be connected again
 * elsewhere; its stale entry must not mark that other peer).
 */
static __always_inline int redirected_backend(struct bpf_sock_ops *skops, struct route_key *key)
{
	struct orig_dst *od = redirected_dst(skops);
	if (!od)
		return 0;
	key->addr = od->backend_addr;
	key->port = od->backend_port;
	key->pad = 0;
	return 1;
}

static __always_inline void mark(struct route_key *key, __u32 why)
{
	__u64 now = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&tether_suspect, key, &now, BPF_ANY) == 0)
		health_count(why);
}

/* sk_err of the socket, or 0 when it cannot be read (no mark then: a
 * missing mark costs a failed connect, a false one a healthy backend). */
static __always_inline int sock_err(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	return ((struct sock *)tp)->sk_err;
}

/* Every path returns 1, like intent.c: the verdict of a sockops program
 * only matters to callbacks that ask for one. */
SEC("sockops")
int tether_health(struct bpf_sock_ops *skops)
{
	struct route_key key = {};
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Only redirected sockets pay for the state and RTO callbacks,
		 * and none while passive health is off. */
		if (suspect_hold_ns() != 0 && redirected_backend(skops, &key))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | HEALTH_CB_FLAGS);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (!(skops->bpf_sock_ops_cb_flags & HEALTH_CB_FLAGS))
			break;
		/* The connect is done: the backend answers. Later RTOs of an
		 * established connection say nothing about new connects, so the
		 * callbacks stop here. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~HEALTH_CB_FLAGS);
		if (redirected_backend(skops, &key) && bpf_map_delete_elem(&tether_suspect, &key) == 0)
			health_count(HEALTH_CLEARED);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[0] is the old state, args[1] the new one. */
		if (skops->args[0] != BPF_TCP_SYN_SENT || skops->args[1] != BPF_TCP_CLOSE)
			break;
		if (!redirected_backend(skops, &key))
			break;
		int err = sock_err(skops);
		if (err == ECONNREFUSED)
			mark(&key, HEALTH_MARKED_REFUSED);
		else if (err != 0)
			mark(&key, HEALTH_MARKED_TIMEOUT);
		/* err == 0: the application closed its own pending connect. */
		break;
	case BPF_SOCK_OPS_RTO_CB:
		if (skops->state == BPF_TCP_SYN_SENT && redirected_backend(skops, &key))
			mark(&key, HEALTH_MARKED_TIMEOUT);
		break;
	}
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
