package main

import (
	"fmt"
	"io"
	"sort"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/tether-net/tether/redirector"
)

func writeStatus(cmd *cobra.Command, st redirector.Status) error {
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	writeDaemon(tw, st.Daemon)
	fmt.Fprintf(tw, "pin dir\t%s\n", st.PinDir)
	cgroup := st.Cgroup
	if cgroup == "" {
		cgroup = "unknown (no pinned link, or not under this host's cgroup2 mount)"
	}
	fmt.Fprintf(tw, "cgroup\t%s\n", cgroup)
	fmt.Fprintf(tw, "map fill\t%d of %d routes (%.1f%%)\n", st.Routes, st.Capacity, fillPercent(st.Routes, st.Capacity))
	fmt.Fprintf(tw, "links\t%v\n", st.Links)
	for _, p := range st.Programs {
		fmt.Fprintf(tw, "  %s\tlink id %d, program id %d (bpftool prog show id %d)\n", p.Link, p.LinkID, p.ProgramID, p.ProgramID)
	}
	writeMapState(tw, st)
	writeHealth(tw, st.Health)
	names := make([]string, 0, len(st.Counters))
	for k := range st.Counters {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(tw, "%s\t%d\n", k, st.Counters[k])
	}
	return tw.Flush()
}

// writeMapState prints what the redirector stored about its route map
// writes and the PS deadlines in the kernel.
func writeMapState(w io.Writer, st redirector.Status) {
	switch ws := st.Writes; {
	case ws == nil:
		fmt.Fprintf(w, "route map state\tunknown (no redirector of this version has run)\n")
	case ws.MapFull:
		fmt.Fprintf(w, "route map state\tFULL: %d routes not in the kernel map (raise --map-size)\n", ws.RoutesNotWritten)
	case ws.RoutesNotWritten > 0:
		fmt.Fprintf(w, "route map state\tFAILING: %d routes not in the kernel map, retrying\n", ws.RoutesNotWritten)
	default:
		fmt.Fprintf(w, "route map state\tok\n")
	}
	if ws := st.Writes; ws != nil {
		fmt.Fprintf(w, "route write errors\tmap_full %d, other %d\n", ws.WriteErrors[redirector.WriteMapFull], ws.WriteErrors[redirector.WriteOther])
		fmt.Fprintf(w, "state written\t%.0fs ago (kernel grace %s)\n", ws.UpdatedSecondsAgo, ws.KernelGrace)
	}
	fmt.Fprintf(w, "ps deadlines\t%d addresses, %d lapsed %v\n", st.Deadlines.PSAddresses, len(st.Deadlines.Lapsed), st.Deadlines.Lapsed)
}

// writeHealth prints passive health: the hold-down, its counters, and the
// backends marked suspect (newest first).
func writeHealth(w io.Writer, h *redirector.HealthStatus) {
	if h == nil {
		fmt.Fprintf(w, "passive health	not installed (an older version's pins)\n")
		return
	}
	fmt.Fprintf(w, "passive health	hold-down %s; %d backends marked, %d avoided now\n", h.Hold, h.Marked, h.Avoided)
	fmt.Fprintf(w, "health events	marked_refused %d, marked_timeout %d, cleared %d, avoided %d, retried_after_hold %d\n",
		h.Counters["marked_refused"], h.Counters["marked_timeout"], h.Counters["cleared"], h.Counters["avoided"], h.Counters["retried_after_hold"])
	for _, s := range h.Suspects {
		state := "hold-down over"
		if s.WithinHoldDown {
			state = "avoided"
		}
		fmt.Fprintf(w, "  suspect %s\tmarked %.1fs ago, %s\n", s.Backend, s.MarkedSecondsAgo, state)
	}
	if h.Marked > len(h.Suspects) {
		fmt.Fprintf(w, "  ...\t%d more (tether redirector status -o json, or bpftool map dump pinned <pin-dir>/tether_suspect)\n", h.Marked-len(h.Suspects))
	}
}

// writeDaemon prints whether a redirector is running, its PID and the
// time of its last full sync with the registry.
func writeDaemon(w io.Writer, d redirector.DaemonStatus) {
	fmt.Fprintf(w, "redirector\t%s\n", d.Verdict)
	if d.PID > 0 {
		seen := "a process with this PID exists here"
		if !d.PIDExistsHere {
			seen = "no process with this PID here (stopped, or in another PID namespace)"
		}
		fmt.Fprintf(w, "pid\t%d (%s)\n", d.PID, seen)
	}
	if d.LastFullSyncSecondsAgo != nil {
		fmt.Fprintf(w, "last full sync\t%s ago\n", seconds(*d.LastFullSyncSecondsAgo))
	} else if d.HeartbeatSecondsAgo != nil {
		fmt.Fprintf(w, "last full sync\tnone yet\n")
	}
}

func fillPercent(n int, capacity uint32) float64 {
	if capacity == 0 {
		return 0
	}
	return 100 * float64(n) / float64(capacity)
}
