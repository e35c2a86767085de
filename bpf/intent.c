//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: the intent-carrying SYN. Every connection that cgroup/connect4 or
 * cgroup/connect6 redirected (it has a tether_orig_dst entry) sends, in its
 * SYN only, an RFC 6994 experimental TCP option naming the target the
 * application dialed:
 *
 *   kind 254, length 10, ExID 0x7E7E, IPv4 address (4 bytes), port (2 bytes)
 *
 * all in network byte order. The PS reads it back from TCP_SAVED_SYN after
 * accept() and resets a connection whose intent is not the target its port
 * serves, so a stale route can never deliver a connection to the wrong agent
 * (ps/intent.go parses it; the constants there must match these).
 * Connections without a tether_orig_dst entry are never touched.
 *
 * Needs the header-option callbacks (Linux >= 5.10). Attached to the same
 * cgroup as connect4, with the same pinned maps (tether.h).
 */
#include "tether.h"

#define INTENT_KIND 254
#define INTENT_LEN 10
#define INTENT_EXID 0x7E7E
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10

enum intent_counter {
	INTENT_WRITTEN = 0, /* SYNs that carried the intent option */
	INTENT_NO_ROOM = 1, /* redirected SYNs without room left for it */
	INTENT_COUNTER_MAX = 2,
};

const enum intent_counter *unused_intent_counter __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, INTENT_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_intent_counters SEC(".maps");

struct intent_opt {
	__u8 kind;
	__u8 len;
	__be16 exid;
	__be32 addr;
	__be16 port;
} __attribute__((packed));

static __always_inline void intent_count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&tether_intent_counters, &which);
	if (v)
		*v += 1;
}

/* The SYN of an active open: SYN set, ACK clear. The current-MSS length
 * call has no packet (flags 0), so it never reserves: reserving there would
 * shrink every segment of the connection. */
static __always_inline int is_syn(struct bpf_sock_ops *skops)
{
	return (skops->skb_tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == TCPHDR_SYN;
}

/* Every path returns 1: with 0 the kernel drops the reservation silently. */
SEC("sockops")
int tether_intent(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Early enough for the SYN; only redirected sockets pay for the
		 * header callbacks. */
		if (redirected_dst(skops))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* The SYN is gone: stop the per-packet callbacks. */
		if (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG)
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if (is_syn(skops) && bpf_reserve_hdr_opt(skops, INTENT_LEN, 0) != 0)
			intent_count(INTENT_NO_ROOM);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB: {
		if (!is_syn(skops))
			break;
		struct orig_dst *od = redirected_dst(skops);
		if (!od)
			break; /* the reserved bytes stay NOPs */
		struct intent_opt opt = {
			.kind = INTENT_KIND,
			.len = INTENT_LEN,
			.exid = bpf_htons(INTENT_EXID),
			.addr = od->addr,
			.port = od->port,
		};
		if (bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0) == 0)
			intent_count(INTENT_WRITTEN);
		break;
	}
	}
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
