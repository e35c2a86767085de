package registry

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
)

// The owner of a backend is the credential its agent authenticated with: an
// agent id held live on one PS under one credential cannot be published on
// another PS under another.
func TestAnotherCredentialCannotTakeALiveAgentID(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	for _, id := range []string{"ps1", "ps2", "ps3"} {
		if err := reg.RenewPS(ctx, PSLease{ID: id, Addr: ap("127.0.0.1:1").Addr(), TTL: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	target := ap("198.18.1.11:8080")
	mustPublish(t, reg, "ps1", Publication{Target: target, Port: 20001, AgentID: "a1", Owner: "tok:victim"})

	// The same agent id under another credential, on another PS: refused,
	// and the error says why.
	errs, err := reg.Publish(ctx, "ps2", []Publication{{Target: target, Port: 30001, AgentID: "a1", Owner: "tok:intruder"}})
	if err != nil {
		t.Fatal(err)
	}
	var ce *ConflictError
	if !errors.As(errs[0], &ce) || !errors.Is(errs[0], ErrConflict) || !ce.OtherCredential || ce.Holder != "a1" || ce.Target != target {
		t.Fatalf("same agent id, other credential: want an owner conflict, got %#v", errs[0])
	}
	if !strings.Contains(errs[0].Error(), `held by agent "a1" with another credential`) {
		t.Errorf("the error does not say it is the credential: %v", errs[0])
	}

	// Another agent id: refused as before, and not called a credential issue.
	errs, _ = reg.Publish(ctx, "ps2", []Publication{{Target: target, Port: 30001, AgentID: "a2", Owner: "tok:victim"}})
	if !errors.As(errs[0], &ce) || ce.OtherCredential || ce.Holder != "a1" {
		t.Fatalf("another agent id: want a plain conflict, got %#v", errs[0])
	}

	rt, err := reg.Get(ctx, target)
	if err != nil || len(rt.Backends) != 1 || rt.Backends[0].Owner != "tok:victim" {
		t.Fatalf("the victim's route changed: %+v %v", rt.Backends, err)
	}

	// The same agent on another PS under the same credential is the normal
	// multi-PS case; so is a publication without an owner (an --insecure PS).
	mustPublish(t, reg, "ps2", Publication{Target: target, Port: 30001, AgentID: "a1", Owner: "tok:victim"})
	mustPublish(t, reg, "ps3", Publication{Target: target, Port: 40001, AgentID: "a1"})

	rt, _ = reg.Get(ctx, target)
	owners := map[string]string{}
	for _, b := range rt.Backends {
		owners[b.PSID] = b.Owner
	}
	if owners["ps1"] != "tok:victim" || owners["ps2"] != "tok:victim" || owners["ps3"] != "" {
		t.Fatalf("owners per PS: %v", owners)
	}
	raw, _ := json.Marshal(rt.Backends[0])
	if !strings.Contains(string(raw), `"owner":"tok:victim"`) {
		t.Errorf("the owner is missing from the JSON of a backend: %s", raw)
	}

	// On its own PS, a newer session's publication under another
	// credential is the PS's decision, not the registry's.
	own := ap("198.18.1.14:8080")
	mustPublish(t, reg, "ps1", Publication{Target: own, Port: 20002, AgentID: "a1", Owner: "tok:old"})
	mustPublish(t, reg, "ps1", Publication{Target: own, Port: 20003, AgentID: "a1", Owner: "tok:new"})
	if rt, err := reg.Get(ctx, own); err != nil || rt.Backends[0].Owner != "tok:new" || rt.Backends[0].Address.Port() != 20003 {
		t.Fatalf("re-publication on the same PS: %+v %v", rt.Backends, err)
	}
}

// An entry written before owners existed has none: it never refuses on
// the owner's ground, and a holder whose lease lapsed refuses nothing.
func TestOwnerlessAndDeadHoldersDoNotRefuseOnOwner(t *testing.T) {
	ctx := context.Background()
	rd := testutil.StartRedis(t)
	reg := newTestRegistry(t, rd.URL(), nil)
	for _, id := range []string{"ps1", "ps2", "ps3"} {
		if err := reg.RenewPS(ctx, PSLease{ID: id, Addr: ap("127.0.0.1:1").Addr(), TTL: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	old := ap("198.18.1.12:8080")
	// What an older PS wrote.
	reg.rdb.HSet(ctx, reg.keys.route(old), "ps1", `{"port":20001,"agent_id":"a1"}`)
	reg.rdb.SAdd(ctx, reg.keys.targets(), old.String())
	mustPublish(t, reg, "ps2", Publication{Target: old, Port: 30001, AgentID: "a1", Owner: "tok:x"})
	if rt, err := reg.Get(ctx, old); err != nil || len(rt.Backends) != 2 || rt.Backends[0].Owner != "" {
		t.Fatalf("an ownerless entry next to an owned one: %+v %v", rt.Backends, err)
	}

	held := ap("198.18.1.13:8080")
	mustPublish(t, reg, "ps1", Publication{Target: held, Port: 20002, AgentID: "a1", Owner: "tok:x"})
	if err := reg.RenewPS(ctx, PSLease{ID: "ps1", Addr: ap("127.0.0.1:1").Addr(), TTL: -time.Second}); err != nil {
		t.Fatal(err)
	}
	mustPublish(t, reg, "ps3", Publication{Target: held, Port: 40002, AgentID: "a1", Owner: "tok:y"})
}
