package benchutil

import (
	"flag"
	"fmt"
	"math"
	"os"
)

// Checks collects what a benchmark run found wrong. A benchmark asserts
// only what holds on any machine, however loaded: every figure is positive
// and finite, every stream carried what was sent, every setup step took
// effect, every row was measured. Never a figure against a threshold.
type Checks struct {
	name   string
	passed int
	failed []string
}

// NewChecks returns the checks of the program name (the prefix of its
// messages).
func NewChecks(name string) *Checks { return &Checks{name: name} }

// Failf records a failed check.
func (c *Checks) Failf(format string, args ...any) {
	c.failed = append(c.failed, fmt.Sprintf(format, args...))
}

// True records a check: ok, or the failure described by format and args.
func (c *Checks) True(ok bool, format string, args ...any) bool {
	if !ok {
		c.Failf(format, args...)
		return false
	}
	c.passed++
	return true
}

// Positive checks that the figure what is positive and finite.
func (c *Checks) Positive(what string, v float64) bool {
	return c.True(v > 0 && !math.IsInf(v, 0) && !math.IsNaN(v), "%s: got %v, want a positive finite number", what, v)
}

// Equal checks that the count what is want.
func (c *Checks) Equal(what string, got, want int) bool {
	return c.True(got == want, "%s: got %d, want %d", what, got, want)
}

// Finish ends the program: with err (a step that could not run) or any
// failed check it prints them and exits 1; otherwise it prints how many
// checks passed.
func (c *Checks) Finish(err error) {
	if err != nil {
		c.Failf("%v", err)
	}
	if len(c.failed) == 0 {
		fmt.Printf("%s: ok, %d checks passed\n", c.name, c.passed)
		return
	}
	for _, f := range c.failed {
		fmt.Fprintf(os.Stderr, "%s: FAIL: %s\n", c.name, f)
	}
	fmt.Fprintf(os.Stderr, "%s: %d failed, %d passed\n", c.name, len(c.failed), c.passed)
	os.Exit(1)
}

// SmokeDefaults gives each flag named in values that value, unless the
// command line set it: -smoke shrinks durations and sizes, and an explicit
// flag still wins.
func SmokeDefaults(fs *flag.FlagSet, values map[string]string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, v := range values {
		if set[name] {
			continue
		}
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("-smoke: -%s=%s: %w", name, v, err)
		}
	}
	return nil
}
