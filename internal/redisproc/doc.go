// Package redisproc starts and stops a private redis-server on a free
// loopback port, for tests and benchmarks.
//
// A Server is started with Start and is ready when it answers PING (which
// Redis refuses while it is still loading its data), never after a guessed
// sleep. It can be stopped (SIGTERM), killed (SIGKILL, as a crash would) and
// started again on the same port and data directory, so tests can exercise
// a Redis restart; with Options.Persist the data survives that restart.
//
// The package knows nothing of testing.TB: internal/testutil wraps it for
// tests, test/bench/benchutil for benchmark programs.
package redisproc
