// Package benchutil owns what the benchmark programs share: a throwaway
// redis-server on a free loopback port (Linux only).
package benchutil
