package registry

import (
	"sync"
	"time"
)

// leaseJudge is the clock a Mirror judges leases on. It advances with real
// time only while the mirror can see the registry, and never goes back.
//
// Why: a lease in the mirror lapses when its PS stops renewing it, but a
// reader that cannot reach Redis cannot tell a PS that stopped renewing
// from renewals it cannot see. Judging on real time would mark every
// backend dead after one lease of a registry outage although every PS is
// healthy; judging on this clock keeps every backend as it was while the
// registry is out of sight, and resumes expiry when it returns.
//
// The clock J is min(now, lastContact+staleAfter) - offset:
//   - lastContact is the end of the last successful registry call; calls
//     return at least every block time while Redis is healthy, so
//     staleAfter (a little more) tells a quiet feed from a blind one.
//   - J runs up to staleAfter past the last contact before it stops, so a
//     lease renewed on time must have more than that left when it is read:
//     the block time is a quarter of the shortest lease seen (at most 1s),
//     and a PS renews at least twice per lease (it has at least half a
//     lease left at every renewal), so staleAfter stays well below that.
//   - when contact returns after a blind gap, offset grows by the part of
//     the gap J did not advance, so J continues from where it froze;
//   - once contact has been continuous for longer than the longest lease
//     seen (plus slack), offset goes back to zero: by then every live PS has
//     renewed, and a lease still not renewed is one whose PS died during
//     the outage, which may be judged on real time again.
type leaseJudge struct {
	now func() time.Time

	mu           sync.Mutex
	lastContact  time.Time     // zero before the first contact
	contactSince time.Time     // start of the current stretch of continuous contact
	offset       time.Duration // how far J trails real time after outages
	last         time.Time     // the latest J handed out: J never goes back
	// leaseOf holds, per PS, the longest time left seen on its lease: its
	// lease duration, near enough (a read right after a renewal sees it).
	leaseOf map[string]time.Duration
}

// Bounds of the lease durations the judge learns from leases it reads: a
// test or tool writing hour-long leases must not keep readers on a lagging
// clock for an hour. A PS renews at least twice per lease, so any lease
// estimate above its renew period is enough for the reset to be safe.
const (
	minLeaseGuess = time.Second
	maxLeaseGuess = time.Minute
	// judgeSlack is added to the longest lease before the clock returns
	// to real time: room for a PS renewal in flight and a read after it.
	judgeSlack = time.Second
	// Bounds of the feed's block time (see block).
	maxFeedBlock = time.Second
	minFeedBlock = 100 * time.Millisecond
)

func newLeaseJudge(now func() time.Time) *leaseJudge {
	return &leaseJudge{now: now, leaseOf: map[string]time.Duration{}}
}

// block is how long a feed read may wait for changes: a quarter of the
// shortest lease seen, within [minFeedBlock, maxFeedBlock].
func (j *leaseJudge) block() time.Duration {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.blockLocked()
}

func (j *leaseJudge) blockLocked() time.Duration {
	b := maxFeedBlock
	for _, d := range j.leaseOf {
		b = min(b, d/4)
	}
	return max(b, minFeedBlock)
}

// staleAfterLocked is how long after the last contact the registry counts
// as out of sight: the block time plus half of it for the round trip and
// the apply.
func (j *leaseJudge) staleAfterLocked() time.Duration {
	b := j.blockLocked()
	return b + b/2
}

// contact records a successful registry call that ended at now. It
// returns how long the registry had been out of sight before it (0 when
// contact was continuous), so the caller can log a recovery.
func (j *leaseJudge) contact() (gap time.Duration) {
	j.mu.Lock()
	defer j.mu.Unlock()
	now := j.now()
	if j.lastContact.IsZero() {
		j.lastContact, j.contactSince = now, now
		return 0
	}
	stale := j.staleAfterLocked()
	if since := now.Sub(j.lastContact); since > stale {
		// J froze at lastContact+staleAfter; continue from there.
		gap = since
		j.offset += since - stale
		j.contactSince = now
	}
	j.lastContact = now
	if j.offset > 0 && now.Sub(j.contactSince) > j.longestLocked()+judgeSlack {
		j.offset = 0
	}
	return gap
}

// observeLease records how long PS id's lease, read just now, has left:
// the longest such time approximates the PS's lease duration.
func (j *leaseJudge) observeLease(id string, left time.Duration) {
	if left <= 0 {
		return
	}
	left = min(left, maxLeaseGuess)
	j.mu.Lock()
	if left > j.leaseOf[id] {
		j.leaseOf[id] = left
	}
	j.mu.Unlock()
}

// forget drops what was learnt of the PS nodes not in keep (gone from the
// registry), so a short-lease PS long gone no longer shortens the block.
func (j *leaseJudge) forget(keep map[string]PSLease) {
	j.mu.Lock()
	defer j.mu.Unlock()
	for id := range j.leaseOf {
		if _, ok := keep[id]; !ok {
			delete(j.leaseOf, id)
		}
	}
}

// longest returns the longest lease duration seen (within the bounds).
func (j *leaseJudge) longest() time.Duration {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.longestLocked()
}

func (j *leaseJudge) longestLocked() time.Duration {
	l := minLeaseGuess
	for _, d := range j.leaseOf {
		l = max(l, d)
	}
	return l
}

// Now returns J, the time leases are judged at.
func (j *leaseJudge) Now() time.Time {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.nowLocked(j.now())
}

// nowLocked is J at real time now.
func (j *leaseJudge) nowLocked(now time.Time) time.Time {
	if j.lastContact.IsZero() {
		// Nothing read yet: there is nothing to judge either.
		return j.advance(now)
	}
	return j.advance(minTime(now, j.lastContact.Add(j.staleAfterLocked())).Add(-j.offset))
}

// advance keeps J monotonic.
func (j *leaseJudge) advance(t time.Time) time.Time {
	if t.Before(j.last) {
		return j.last
	}
	j.last = t
	return t
}

// state reports whether J stands still now (the registry out of sight),
// and how far J trails real time.
func (j *leaseJudge) state() (blind bool, lag time.Duration) {
	j.mu.Lock()
	defer j.mu.Unlock()
	now := j.now()
	if j.lastContact.IsZero() {
		return false, 0
	}
	blind = now.Sub(j.lastContact) > j.staleAfterLocked()
	return blind, max(now.Sub(j.nowLocked(now)), 0)
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
