package cliconfig

import (
	"reflect"
	"slices"
	"strings"
	"sync"
)

// knownKeys holds the top-level file keys of every config struct bound in
// this process. tether builds all its commands (and so calls Bind for each)
// before it runs one, so while a command resolves its file this set holds
// the keys of every tether command: that is what lets one file carry the
// settings of several commands. A key in the set that the running command
// does not have is ignored; a key in no command is an error.
var knownKeys = struct {
	sync.Mutex
	set map[string]bool
}{set: map[string]bool{}}

// rememberKeys adds the file keys of struct type t to knownKeys.
func rememberKeys(t reflect.Type) {
	knownKeys.Lock()
	defer knownKeys.Unlock()
	for _, k := range fileKeys(t) {
		knownKeys.set[k] = true
	}
}

// isKnownKey reports whether some bound command has the file key k.
func isKnownKey(k string) bool {
	knownKeys.Lock()
	defer knownKeys.Unlock()
	return knownKeys.set[k]
}

// allKnownKeys returns every remembered key, sorted.
func allKnownKeys() []string {
	knownKeys.Lock()
	defer knownKeys.Unlock()
	out := make([]string, 0, len(knownKeys.set))
	for k := range knownKeys.set {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// fileKeys returns the file keys of struct type t, in field order.
func fileKeys(t reflect.Type) []string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		if name, ok := fileKey(t.Field(i)); ok {
			keys = append(keys, name)
		}
	}
	return keys
}

// fileKey is the YAML key of a struct field: the name in its `yaml` tag.
// Only exported fields with a yaml tag other than "-" are file keys, so a
// field set by code (a logger, a registry) can never be set from a file.
func fileKey(sf reflect.StructField) (string, bool) {
	if !sf.IsExported() {
		return "", false
	}
	name, _, _ := strings.Cut(sf.Tag.Get("yaml"), ",")
	if name == "" || name == "-" {
		return "", false
	}
	return name, true
}

// suggest returns the candidate nearest to key, or "" when none is near
// enough to be a plausible typo. Case and '_' versus '-' do not count as
// differences (redis_prefix is redis-prefix), and a swap of two adjacent
// letters counts as one edit.
func suggest(key string, candidates []string) string {
	norm := func(s string) string { return strings.ReplaceAll(strings.ToLower(s), "_", "-") }
	nk := norm(key)
	// Short keys tolerate one edit, longer ones two: beyond that the
	// "nearest" key is more likely a different setting than a typo.
	limit := 1
	if len([]rune(nk)) >= 5 {
		limit = 2
	}
	best, bestDist := "", limit+1
	for _, c := range candidates {
		if d := editDistance(nk, norm(c)); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance between a and b:
// insertions, deletions, substitutions and transpositions of adjacent
// runes each cost one.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	// d[i][j] is the distance between ra[:i] and rb[:j].
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}
