//go:build !unix

package dataplane

// fileLimit is unknown here: no cap is derived from it.
func fileLimit() int { return 0 }
