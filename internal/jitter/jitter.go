// Package jitter owns the randomness added to periodic work and retries, so
// that many processes that started, or lost something, at the same moment
// spread their next attempt out instead of acting in step.
package jitter

import (
	"math/rand/v2"
	"time"
)

// Spread returns d scaled by a random factor in [1-frac, 1+frac). frac is
// clamped to [0, 1].
func Spread(d time.Duration, frac float64) time.Duration {
	frac = min(max(frac, 0), 1)
	return time.Duration(float64(d) * (1 - frac + 2*frac*rand.Float64()))
}
