package dataplane

// Envoy folds case in ASCII only (absl::AsciiStrToLower) when it picks a virtual host.
// strings.ToLower and strings.EqualFold fold Unicode too, and
// ToLower turns every invalid UTF-8 byte into U+FFFD, so two different Host bytes would pick
// the same virtual host here and different ones (or none) in Envoy.

// asciiLower lower-cases A-Z and leaves every other byte as it is; s itself when it has no
// upper-case letter.
func asciiLower(s string) string {
	i := 0
	for i < len(s) && (s[i] < 'A' || s[i] > 'Z') {
		i++
	}
	if i == len(s) {
		return s
	}
	b := []byte(s)
	for ; i < len(b); i++ {
		if 'A' <= b[i] && b[i] <= 'Z' {
			b[i] += 'a' - 'A'
		}
	}
	return string(b)
}
