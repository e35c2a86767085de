package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-net/tether/internal/testutil"
	"github.com/tether-net/tether/test/netsim"
)

// loopClient is a client on central, in the redirector's cgroup, that
// requests every agent round-robin until stopped and timestamps every
// request, so a test can say what failed before, during and after an event.
type loopClient struct {
	p       *netsim.Proc
	targets []string
}

// healthyOK is how many answers every target must give before an event
// (the loop is running and the system is healthy) and after it (the
// system recovered), counted per target.
const healthyOK = 20

// startLoop starts the loop client and waits until every target has
// answered healthyOK times.
func (w *world) startLoop(t *testing.T) *loopClient {
	t.Helper()
	self, _ := os.Executable()
	var specs, targets []string
	for host := range agents {
		specs = append(specs, w.Target(host)+"="+host)
		targets = append(targets, w.Target(host))
	}
	sort.Strings(targets)
	p := w.start(t, "client-loop", "central", netsim.StartOpts{Cgroup: w.cg.Path,
		Env: []string{clientEnv + "=loop", clientMaxEnv + "=3m"}}, self, "-test.run=^$", strings.Join(specs, ","))
	l := &loopClient{p: p, targets: targets}
	l.waitOK(t, time.Time{}, "before the event")
	return l
}

// waitOK waits until every target has answered healthyOK times in requests
// that began after since.
func (l *loopClient) waitOK(t *testing.T, since time.Time, what string) {
	t.Helper()
	timeout := max(time.Until(since), 0) + 30*time.Second
	if err := testutil.Poll(t.Context(), timeout, func() error {
		if l.p.Exited() {
			return fmt.Errorf("the loop client exited:\n%s", tail(l.p.Log(), 2000))
		}
		return l.run().okSince(since, l.targets, healthyOK)
	}); err != nil {
		r := l.run()
		t.Fatalf("loop client %s: %v (%s)", what, err, r.summary(since))
	}
}

// stop ends the loop client (SIGTERM: it finishes its request and prints
// its last line) and returns every request it made.
func (l *loopClient) stop(t *testing.T) loopRun {
	t.Helper()
	_ = l.p.Signal(syscall.SIGTERM)
	if err := l.p.Wait(requestTimeout + 10*time.Second); err != nil {
		t.Fatalf("loop client did not end cleanly on SIGTERM: %v\n%s", err, tail(l.p.Log(), 2000))
	}
	if !strings.Contains(lastLine(l.p.Log()), loopDone) {
		t.Fatalf("loop client did not print its last line:\n%s", tail(l.p.Log(), 2000))
	}
	return l.run()
}

// run parses the samples printed so far (a line still being written is
// skipped).
func (l *loopClient) run() loopRun {
	var r loopRun
	for _, line := range strings.Split(l.p.Log(), "\n") {
		var s sample
		if strings.HasPrefix(line, "{") && json.Unmarshal([]byte(line), &s) == nil {
			r = append(r, s)
		}
	}
	return r
}

// loopRun is every request of a loop client, in the order it made them.
type loopRun []sample

func (r loopRun) with(result string) loopRun {
	var out loopRun
	for _, s := range r {
		if s.Result == result {
			out = append(out, s)
		}
	}
	return out
}

// okSince says which target answered fewer than n times in requests that
// began after since.
func (r loopRun) okSince(since time.Time, targets []string, n int) error {
	ok := map[string]int{}
	for _, s := range r.with(resultOK) {
		if s.start().After(since) {
			ok[s.Target]++
		}
	}
	var short []string
	for _, t := range targets {
		if ok[t] < n {
			short = append(short, fmt.Sprintf("%s answered %d times, want %d", t, ok[t], n))
		}
	}
	if len(short) > 0 {
		when := "since the start"
		if !since.IsZero() {
			when = "after " + since.Format("15:04:05.000")
		}
		return fmt.Errorf("%s: %s", when, strings.Join(short, "; "))
	}
	return nil
}

// longestOutage is the longest time during which every request failed:
// from the start of the first of consecutive failed requests to the end of
// the last.
func (r loopRun) longestOutage() time.Duration {
	var longest time.Duration
	var since time.Time
	for _, s := range r {
		if s.Result != resultFailed {
			since = time.Time{}
			continue
		}
		if since.IsZero() {
			since = s.start()
		}
		longest = max(longest, s.end().Sub(since))
	}
	return longest
}

// summary describes the run relative to the event at.
func (r loopRun) summary(at time.Time) string {
	failed := r.with(resultFailed)
	s := fmt.Sprintf("%d requests, %d ok, %d failed, %d wrong", len(r), len(r.with(resultOK)), len(failed), len(r.with(resultWrong)))
	if len(failed) > 0 {
		if at.IsZero() {
			at = r[0].start()
		}
		first, last := failed[0], failed[len(failed)-1]
		s += fmt.Sprintf("; failures from %v to %v after %s, longest outage %v; last error on %s: %s",
			first.end().Sub(at).Round(time.Millisecond), last.end().Sub(at).Round(time.Millisecond), at.Format("15:04:05.000"),
			r.longestOutage().Round(time.Millisecond), last.Target, last.Detail)
	}
	return s
}

// disturbance is what an event may cost the loop client.
type disturbance struct {
	what string
	at   time.Time // when the event began
	// window: requests may fail only if their failure is seen in
	// [at, at+window]; zero means no request may fail at all.
	window time.Duration
	// only, when set, is the one target allowed to fail.
	only string
	// maxOutage, when set, bounds the longest time during which every
	// request failed.
	maxOutage time.Duration
}

// check asserts that the run paid no more than d for its event: no wrong
// answer ever, no failure before the event or outside its window, and every
// target answering again after the window.
func (d disturbance) check(t *testing.T, r loopRun, targets []string) {
	t.Helper()
	sum := r.summary(d.at)
	if wrong := r.with(resultWrong); len(wrong) > 0 {
		t.Errorf("%s: %d answers came from the wrong host, e.g. %+v (%s)", d.what, len(wrong), wrong[0], sum)
	}
	if err := r.okSince(time.Time{}, targets, 1); err != nil || len(r) == 0 || r[0].start().After(d.at) {
		t.Errorf("%s: the loop client was not running before the event: %v (%s)", d.what, err, sum)
	}
	if bad := d.firstBadFailure(r); bad != "" {
		t.Errorf("%s: %s (%s)", d.what, bad, sum)
	}
	if d.maxOutage > 0 && r.longestOutage() > d.maxOutage {
		t.Errorf("%s: every request failed for %v, more than %v (%s)", d.what, r.longestOutage(), d.maxOutage, sum)
	}
	if err := r.okSince(d.at.Add(d.window), targets, healthyOK); err != nil {
		t.Errorf("%s: not every target answered again after the event: %v (%s)", d.what, err, sum)
	}
}

// firstBadFailure names the first failed request the disturbance does not
// allow, or returns "".
func (d disturbance) firstBadFailure(r loopRun) string {
	for _, s := range r.with(resultFailed) {
		after := s.end().Sub(d.at).Round(time.Millisecond)
		switch {
		case s.end().Before(d.at):
			return fmt.Sprintf("a request to %s failed %v before the event: %s", s.Target, -after, s.Detail)
		case d.window == 0:
			return fmt.Sprintf("must fail no request, but one to %s failed %v after it: %s", s.Target, after, s.Detail)
		case s.end().After(d.at.Add(d.window)):
			return fmt.Sprintf("a request to %s failed %v after the event, past the bound of %v: %s", s.Target, after, d.window, s.Detail)
		case d.only != "" && s.Target != d.only:
			return fmt.Sprintf("only %s may fail, but a request to %s did, %v after the event: %s", d.only, s.Target, after, s.Detail)
		}
	}
	return ""
}
