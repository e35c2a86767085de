// Package benchutil owns what the benchmark programs share: a throwaway
// redis-server on a free loopback port (Linux only), the -smoke defaults,
// and the checks every run makes whatever its figures.
package benchutil
