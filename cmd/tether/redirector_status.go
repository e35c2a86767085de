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
	fmt.Fprintf(tw, "pin dir\t%s\n", st.PinDir)
	fmt.Fprintf(tw, "routes\t%d of %d\n", st.Routes, st.Capacity)
	fmt.Fprintf(tw, "links\t%v\n", st.Links)
	writeMapState(tw, st)
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
