//go:build !unix

package relay

import "io"

// newRawReader returns nil: without raw reads, every source is read with
// a buffer held while it waits (see buffers.adapt).
func newRawReader(io.Reader) func(*buffers) ([]byte, error) { return nil }
