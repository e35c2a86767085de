/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Passive health: the maps that health.c (sockops, which marks backends
 * whose connects fail) and redirect.c (connect4/6, which avoids them)
 * share, pinned by name like those of tether.h. New maps with names of
 * their own, so that an installation of an older version, whose pinned
 * maps are reused by an in-place upgrade, gains them without any existing
 * map changing size or layout.
 */
#ifndef __TETHER_HEALTH_H
#define __TETHER_HEALTH_H

#include "tether.h"

enum health_counter {
	HEALTH_MARKED_REFUSED = 0,  /* connects answered with a RST: backend marked */
	HEALTH_MARKED_TIMEOUT = 1,  /* SYN retransmitted (no SYN-ACK) or connect given up: marked */
	HEALTH_CLEARED = 2,         /* marks cleared by a connect that succeeded */
	HEALTH_AVOIDED = 3,         /* connects that skipped a suspect backend for an unmarked one */
	HEALTH_RETRIED = 4,         /* connects sent to a backend whose mark is older than the hold-down */
	HEALTH_COUNTER_MAX = 5,
};

/* Slots of tether_health_config, written by the redirector. */
enum health_config_slot {
	HEALTH_CFG_HOLD_NS = 0, /* hold-down in ns; 0 turns passive health off */
	HEALTH_CFG_MAX = 4,     /* room for later settings without a new map */
};

const enum health_counter *unused_health_counter __attribute__((unused));
const enum health_config_slot *unused_health_config_slot __attribute__((unused));

/*
 * tether_suspect: backend (route_key layout: addr, port, network order) ->
 * bpf_ktime_get_ns() of its last failed connect. Entries are deleted by a
 * later success; LRU so that backends that never come back (a PS gone for
 * good) cannot fill it: the oldest marks go first.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct route_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_suspect SEC(".maps");

/* Settings the programs read at run time: a map and not rodata, because
 * pinned programs outlive the redirector that loaded them, and a restart
 * with another --suspect-hold must change what the running programs do. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HEALTH_CFG_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_health_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HEALTH_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tether_health_counters SEC(".maps");

static __always_inline void health_count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&tether_health_counters, &which);
	if (v)
		*v += 1;
}

/* suspect_hold_ns is the hold-down, 0 when passive health is off (also on
 * an installation no redirector of this version has configured yet). */
static __always_inline __u64 suspect_hold_ns(void)
{
	__u32 k = HEALTH_CFG_HOLD_NS;
	__u64 *v = bpf_map_lookup_elem(&tether_health_config, &k);
	return v ? *v : 0;
}

#endif /* __TETHER_HEALTH_H */
