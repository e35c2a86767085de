package registry

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// backendPS lists the PS ids (with ports) that back target now.
func backendsOf(t *testing.T, reg *Registry, target string) []string {
	t.Helper()
	rt, err := reg.Get(context.Background(), ap(target))
	if err != nil {
		return nil
	}
	var out []string
	for _, b := range rt.Backends {
		out = append(out, b.PSID+":"+b.Address.String())
	}
	slices.Sort(out)
	return out
}

// A lost-tunnel report marks dead only the dead PS's entry for the
// reported agent, owner and port; the surviving PS's entry, another agent's
// entry, an entry under another credential and a newer port all stay live,
// and readers hear of each marking on the change feed.
func TestDropBackendsMarksOnlyTheReportedAgentsEntryDead(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	clk := newClock()
	reg := newTestRegistry(t, rd.URL(), clk.Now)
	for _, id := range []string{"ps1", "ps2"} {
		if err := reg.RenewPS(ctx, lease(id, "127.0.0.1", clk.Now().Add(time.Minute))); err != nil {
			t.Fatal(err)
		}
	}
	a, b, c := ap("127.77.0.1:1"), ap("127.77.0.1:2"), ap("127.77.0.2:1")
	mustPublish(t, reg, "ps1",
		Publication{Target: a, Port: 20001, AgentID: "a1", Owner: "tok:1"},
		Publication{Target: b, Port: 20002, AgentID: "a1", Owner: "tok:1"},
		Publication{Target: c, Port: 20003, AgentID: "a2", Owner: "tok:2"})
	mustPublish(t, reg, "ps2",
		Publication{Target: a, Port: 21001, AgentID: "a1", Owner: "tok:1"},
		Publication{Target: b, Port: 21002, AgentID: "a1", Owner: "tok:1"})
	snap, err := reg.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name         string
		agent, owner string
		pubs         []Publication
	}{
		{"wrong port", "a1", "tok:1", []Publication{{Target: a, Port: 20999}}},
		{"another agent's route", "a1", "tok:1", []Publication{{Target: c, Port: 20003}}},
		{"same agent id, another credential", "a1", "tok:9", []Publication{{Target: a, Port: 20001}}},
		{"the reporting agent's route on the live PS", "a1", "tok:1", []Publication{{Target: a, Port: 21001}}},
	} {
		dead := "ps1"
		if tc.pubs[0].Port == 21001 {
			dead = "ps9" // names a PS that has no entry there
		}
		n, err := reg.DropBackends(ctx, dead, tc.agent, tc.owner, tc.pubs)
		if err != nil || n != 0 {
			t.Errorf("%s: dropped %d backends (err %v), want none", tc.name, n, err)
		}
	}
	if got := backendsOf(t, reg, "127.77.0.1:1"); len(got) != 2 {
		t.Fatalf("a report that matched nothing changed the route: %v", got)
	}

	n, err := reg.DropBackends(ctx, "ps1", "a1", "tok:1", []Publication{{Target: a, Port: 20001}, {Target: b, Port: 20002}, {Target: c, Port: 20003}})
	if err != nil || n != 2 {
		t.Fatalf("dropped %d backends (err %v), want 2", n, err)
	}
	if got, want := backendsOf(t, reg, "127.77.0.1:1"), []string{"ps2:127.0.0.1:21001"}; !slices.Equal(got, want) {
		t.Errorf("route a: got %v, want %v", got, want)
	}
	if got, want := backendsOf(t, reg, "127.77.0.1:2"), []string{"ps2:127.0.0.1:21002"}; !slices.Equal(got, want) {
		t.Errorf("route b: got %v, want %v", got, want)
	}
	if got, want := backendsOf(t, reg, "127.77.0.2:1"), []string{"ps1:127.0.0.1:20003"}; !slices.Equal(got, want) {
		t.Errorf("another agent's route c: got %v, want %v", got, want)
	}
	changes, err := reg.ReadChanges(ctx, snap.Cursor, 100, 0)
	if err != nil || len(changes) != 2 {
		t.Errorf("want one change per dropped backend on the feed, got %+v (err %v)", changes, err)
	}
	// The dead PS's own withdrawal (or a peer's collection) later still
	// finds and quarantines the ports, and is harmless.
	used, _ := reg.PortsInUse(ctx, "ps1")
	if _, ok := used[lo(20001)]; !ok {
		t.Errorf("the dropped port's record is gone, so its quarantine would be skipped: %v", used)
	}
	if err := reg.Release(ctx, "ps1", []Publication{{Target: a, Port: 20001}, {Target: b, Port: 20002}}, clk.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got := backendsOf(t, reg, "127.77.0.1:1"); len(got) != 1 {
		t.Errorf("the dead PS's late release touched the survivor: %v", got)
	}
	if q, _ := reg.Quarantined(ctx, "ps1"); len(q) != 2 {
		t.Errorf("want the dropped ports quarantined by the late release, got %v", q)
	}
	// The mark is a dead backend, not an absent one: readers see it and
	// destroy its clients' sockets. Marking again changes nothing.
	if _, err := reg.DropBackends(ctx, "ps1", "a2", "tok:2", []Publication{{Target: c, Port: 20003}}); err != nil {
		t.Fatal(err)
	}
	if got := backendsOf(t, reg, "127.77.0.2:1"); len(got) != 0 {
		t.Errorf("route c still has live backends %v", got)
	}
	all, err := reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	snap2, err := reg.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var lost *Backend
	for _, rt := range snap2.Routes {
		if rt.Target == c && len(rt.Backends) == 1 {
			lost = &rt.Backends[0]
		}
	}
	if lost == nil || !lost.Lost || lost.Live(clk.Now()) {
		t.Fatalf("route c in a snapshot: want one backend marked lost, got %+v (list %v)", lost, all)
	}
	if n, err := reg.DropBackends(ctx, "ps1", "a2", "tok:2", []Publication{{Target: c, Port: 20003}}); err != nil || n != 0 {
		t.Errorf("marking a lost backend again: %d, %v; want 0", n, err)
	}
	// A new publication by that PS (the agent came back to it) clears it.
	mustPublish(t, reg, "ps1", Publication{Target: c, Port: 20004, AgentID: "a2", Owner: "tok:2"})
	if got, want := backendsOf(t, reg, "127.77.0.2:1"), []string{"ps1:127.0.0.1:20004"}; !slices.Equal(got, want) {
		t.Errorf("route c after a new publication: got %v, want %v", got, want)
	}
}

func TestDropBackendsRefusesBadInput(t *testing.T) {
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	ctx := context.Background()
	if _, err := reg.DropBackends(ctx, "bad:id", "a1", "", []Publication{{Target: ap("127.77.0.1:1"), Port: 1}}); err == nil {
		t.Error("a ps id with a colon was accepted")
	}
	if _, err := reg.DropBackends(ctx, "ps1", "", "", nil); err == nil {
		t.Error("an empty agent id was accepted")
	}
	if _, err := reg.DropBackends(ctx, "ps1", "a1", "", []Publication{{Target: ap("127.77.0.1:1")}}); err == nil {
		t.Error("a publication without a port was accepted")
	}
}
