// Package archtest owns the import rules of the tree: which package may
// import which dependency, checked by a test so that a stray import fails
// `make test` instead of slowly blurring the architecture. It has no code
// of its own.
package archtest
