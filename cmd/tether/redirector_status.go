package main

import (
	"fmt"
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
