// Package ident owns the syntax of agent and PS ids.
//
// An id travels in the tunnel handshake, names Redis keys of the registry
// ({P}:ps:<id>, whose colons and braces separate parts and hash tags) and
// appears in logs and metrics labels. One rule for all of them keeps an id
// that one part accepts from being refused, or misparsed, by another.
package ident
