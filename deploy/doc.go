// Package deploy holds tether's deployment kit: systemd units (systemd/),
// example configuration files (config/), and the tests that keep them
// honest. The units are checked with systemd-analyze verify, which only
// warns on an unknown key and accepts any capability name, so the tests
// fail on any warning and check every capability against the kernel's list
// themselves; the redirector and the PS are run under exactly the
// capabilities their units grant, and with each one removed. The PS loads
// its sk_lookup data plane, which attaches to the whole network namespace,
// so the package's tests run in a namespace of their own (TestMain). The
// example configs are loaded by cmd/tether's tests through the same code
// path as `tether <role> --config`.
//
// The package has no code: it exists for its tests.
package deploy
