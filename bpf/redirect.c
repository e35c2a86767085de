//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tether's socket-level redirect.
 *
 * cgroup/connect4 and cgroup/connect6 rewrite connect(target) to a live PS
 * backend of the target's route; cgroup/getpeername4/6 give the application
 * back the address it dialed. The original destination is kept per socket in
 * socket-local storage, so it lives and dies with the socket (no LRU to evict
 * it early). The socket destroyer lives in destroy.c: it needs a kfunc of
 * Linux >= 6.5, and this object must load without it.
 *
 * The redirector's own sockets (its Redis client) are never redirected,
 * even when it runs inside the cgroup it attaches to: see tether_self.
 */
#include "tether.h"
#include "health.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1000000); /* set on the MapSpec before load */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, struct route_entry); /* struct route_value's bytes, see tether.h */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_routes SEC(".maps");

/*
 * tether_self marks the redirector's own sockets: the redirector writes an
 * entry for each socket it opens, keyed by the socket's fd, after socket()
 * and before connect(), and redirect() leaves a marked socket alone.
 * Otherwise a route whose target is the registry's address (registered by
 * a hostile agent, say) would send the redirector's Redis client to that
 * agent when the redirector runs inside its own cgroup.
 *
 * Socket-local storage rather than the alternatives:
 *   - SO_MARK: a mark also steers policy routing, nftables and other
 *     programs (kube-proxy, Cilium and Calico all claim mark bits), so any
 *     fixed value can collide with what the host already does with marks;
 *   - the redirector's PID: PIDs differ per PID namespace (a container) and
 *     are reused, and the pinned programs outlive the process, so a stale
 *     PID would exempt some other process.
 * The storage lives and dies with the socket (nothing to clean up, nothing
 * stale), changes nothing else about it, and only a process holding this
 * map's fd (the redirector, which loaded it) can write it. It is not pinned:
 * each redirector process marks its own sockets in the map its programs use.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} tether_self SEC(".maps");

/*
 * tether_ps_deadline holds, per PS address, the monotonic time
 * (bpf_ktime_get_ns) after which that PS's backends are dead: the latest
 * lease expiry the redirector saw for a PS at that address, plus
 * --kernel-grace. The redirector refreshes it while it runs; once no
 * redirector is alive, the entries lapse on their own and redirect()
 * stops picking those backends, so a dead PS's port can never be reused
 * behind a kernel map nobody maintains.
 *
 * Keyed by the backend address the route value already carries, so the
 * route value's layout (and a pinned route map of an older version) stays
 * as it is, and one update per PS address per refresh covers all its
 * backends. PSs sharing an address share the latest of their deadlines:
 * with the redirector alive the route map itself marks a dead one; with
 * it gone all lapse within a lease of each other.
 *
 * An address without an entry is not checked: a route map written by
 * something other than the redirector (an older version before its first
 * refresh, a benchmark) keeps working as before.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_ps_deadline SEC(".maps");

/*
 * tether_redirector_state is written by the redirector for `tether
 * redirector status` (the programs never read it): whether the route map
 * is full, how many routes are not in it, write errors, and when it was
 * last written. A map of its own rather than slots in tether_counters,
 * whose size a pinned map of an older version fixes. Indices: see
 * redirector/state_linux.go.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_redirector_state SEC(".maps");

/* backend_usable: a live backend whose PS deadline has not passed. */
static __always_inline int backend_usable(const struct backend *b, __u64 now)
{
	if (b->state != BACKEND_LIVE)
		return 0;
	__be32 a = b->addr;
	__u64 *d = bpf_map_lookup_elem(&tether_ps_deadline, &a);
	return !d || now < *d;
}

/* What redirect() decided for one connect(); see redirect(). */
enum redirect_result {
	REDIRECT_NO_ROUTE = -1,
	REDIRECT_REFUSE = 0,
	REDIRECT_REWRITE = 1,
};

/*
 * redirect looks the target addr:port up in tether_routes and picks one of
 * the route's live backends at random, avoiding those marked suspect within
 * the hold-down (tether_suspect, see health.c) while any other is unmarked.
 * It returns:
 *
 *   REDIRECT_NO_ROUTE (-1): the target has no route (COUNTER_NO_ROUTE),
 *     or the socket is the redirector's own (tether_self, not counted);
 *     nothing is written, and connect() goes to the target as dialed.
 *   REDIRECT_REFUSE (0): the target has a route but none of its backends is
 *     live (dead, or past its PS's deadline in tether_ps_deadline), or the
 *     route changed while it was read (COUNTER_NO_BACKEND);
 *     nothing is written, and the caller fails connect() with EHOSTUNREACH.
 *   REDIRECT_REWRITE (1): *new_addr and *new_port hold the chosen backend
 *     (COUNTER_REDIRECTED), and the socket's tether_orig_dst records the
 *     target and the backend for getpeername and the destroyer (unless that
 *     storage cannot be allocated). The caller rewrites the destination.
 */
static __always_inline enum redirect_result
redirect(struct bpf_sock_addr *ctx, __be32 addr, __be16 port, __be32 *new_addr, __be16 *new_port)
{
	struct route_key key = { .addr = addr, .port = port };
	struct route_value *rv = bpf_map_lookup_elem(&tether_routes, &key);
	if (!rv) {
		count(COUNTER_NO_ROUTE);
		return REDIRECT_NO_ROUTE;
	}
	/* Checked only for targets with a route, so connects elsewhere pay
	 * nothing; and before the backends, so the redirector's own connect is
	 * never refused either. No counter of its own: adding one would change
	 * the pinned counter map's size and break in-place upgrades. */
	if (bpf_sk_storage_get(&tether_self, ctx->sk, 0, 0))
		return REDIRECT_NO_ROUTE;

	/* Usable backends, as a bit mask: live, and their PS's deadline not
	 * passed (tether_ps_deadline); each looked up once per connect. */
	__u64 now = bpf_ktime_get_ns();
	__u32 usable = 0, live = 0;
#pragma unroll
	for (int i = 0; i < MAX_BACKENDS; i++)
		if (backend_usable(&rv->backends[i], now)) {
			usable |= 1u << i;
			live++;
		}
	if (live == 0) {
		count(COUNTER_NO_BACKEND);
		return REDIRECT_REFUSE;
	}

	/* Passive health (health.c): among the usable backends, prefer those
	 * not marked suspect within the hold-down. When every usable backend
	 * is suspect, pick among them as if none were: suspicion never refuses
	 * a connect, since a mark may be a client-side fluke, and refusing
	 * would turn it into an outage. */
	__u32 suspect = 0, nsuspect = 0, retried = 0, fresh = live;
	__u64 hold = suspect_hold_ns();
	if (hold != 0) {
#pragma unroll
		for (int i = 0; i < MAX_BACKENDS; i++) {
			if (!(usable & (1u << i)))
				continue;
			struct route_key bk = { .addr = rv->backends[i].addr, .port = rv->backends[i].port };
			__u64 *marked = bpf_map_lookup_elem(&tether_suspect, &bk);
			if (!marked)
				continue;
			/* A mark stamped after now (another CPU) counts as fresh. */
			if (*marked >= now || now - *marked < hold) {
				suspect |= 1u << i;
				nsuspect++;
			} else
				retried |= 1u << i;
		}
		if (suspect != 0 && suspect != usable) {
			usable &= ~suspect;
			fresh = live - nsuspect;
			health_count(HEALTH_AVOIDED);
		}
	}

	/* Spread new connections over the usable backends. */
	__u32 pick = bpf_get_prandom_u32() % fresh;
	__u32 seen = 0;
	struct backend chosen = {};
	__u32 chosen_bit = 0;
#pragma unroll
	for (int i = 0; i < MAX_BACKENDS; i++) {
		if (!(usable & (1u << i)))
			continue;
		if (seen == pick) {
			chosen = rv->backends[i];
			chosen_bit = 1u << i;
			break;
		}
		seen++;
	}
	if (retried & chosen_bit)
		health_count(HEALTH_RETRIED);
	if (chosen.state != BACKEND_LIVE) {
		/* The map changed under us; treat it as no live backend. */
		count(COUNTER_NO_BACKEND);
		return REDIRECT_REFUSE;
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
	return REDIRECT_REWRITE;
}

/*
 * connect_verdict turns redirect()'s result into the connect hooks' return:
 * 1 lets connect() go on (to the backend the hook has written, or untouched
 * without a route); 0 with retval -EHOSTUNREACH fails it. Both hooks share
 * it so that IPv4 and v4-mapped IPv6 sockets can never be treated apart.
 */
static __always_inline int connect_verdict(enum redirect_result r)
{
	if (r == REDIRECT_REFUSE) {
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	return 1;
}

SEC("cgroup/connect4")
int tether_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__be32 addr = 0;
	__be16 port = 0;
	enum redirect_result r = redirect(ctx, ctx->user_ip4, (__be16)ctx->user_port, &addr, &port);
	if (r == REDIRECT_REWRITE) {
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
	}
	return connect_verdict(r);
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
	enum redirect_result r = redirect(ctx, ctx->user_ip6[3], (__be16)ctx->user_port, &addr, &port);
	if (r == REDIRECT_REWRITE) {
		ctx->user_ip6[3] = addr;
		ctx->user_port = (__u32)port;
	}
	return connect_verdict(r);
}

/*
 * dialed_dst returns what the connect hooks recorded for a socket they
 * redirected, counting the getpeername answer the caller rewrites with it,
 * or NULL for any other socket, whose peer address stays as it is.
 */
static __always_inline struct orig_dst *dialed_dst(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = bpf_sk_storage_get(&tether_orig_dst, ctx->sk, 0, 0);
	if (od)
		count(COUNTER_PEER_REWRITTEN);
	return od;
}

SEC("cgroup/getpeername4")
int tether_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = dialed_dst(ctx);
	if (!od)
		return 1;
	ctx->user_ip4 = od->addr;
	ctx->user_port = (__u32)od->port;
	return 1;
}

SEC("cgroup/getpeername6")
int tether_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od = dialed_dst(ctx);
	if (!od)
		return 1;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
	ctx->user_ip6[3] = od->addr;
	ctx->user_port = (__u32)od->port;
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
