// Package textclip owns cutting untrusted text short for logs and errors,
// without breaking UTF-8.
//
// Ids, targets and values read from the network or from Redis end up in log
// lines and error messages. They may be long or not UTF-8 at all; cutting
// them at an arbitrary byte would hand a half rune to a log shipper, and
// printing them whole would let one peer flood the log.
package textclip
