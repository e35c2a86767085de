// Package deploy holds tether's deployment kit: systemd units (systemd/),
// example configuration files (config/), and the tests that keep them
// honest. The units are checked with systemd-analyze verify, which only
// warns on an unknown key and accepts any capability name, so the tests
// fail on any warning and check every capability against the kernel's list
// themselves; the redirector is run under exactly the capabilities its unit
// grants. The example configs are loaded by cmd/tether's tests through the
// same code path as `tether <role> --config`.
//
// The package has no code: it exists for its tests.
package deploy
