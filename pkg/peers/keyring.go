package peers

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/memberlist"
)

// GenerateKey returns a new random 32-byte gossip key, base64 encoded (one keyring line).
func GenerateKey() string {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return base64.StdEncoding.EncodeToString(k)
}

// ParseKeyring parses a keyring file: one base64 key per line (16, 24 or 32 bytes: AES-128, -192
// or -256), the first one encrypting, the others accepted for decryption during a key rotation.
// Blank lines and lines starting with # are ignored. Errors never include key material.
func ParseKeyring(data []byte) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	line := 0
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(t)
		if err != nil {
			return nil, fmt.Errorf("line %d: not base64; generate a key with 'fwdproxy keygen'", line)
		}
		if err := memberlist.ValidateKey(k); err != nil {
			return nil, fmt.Errorf("line %d: key is %d bytes; a gossip key must be 16, 24 or 32 bytes (use 'fwdproxy keygen')", line, len(k))
		}
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("no keys; put the output of 'fwdproxy keygen' in the file")
	}
	return keys, nil
}

// LoadKeyring reads a keyring file (see ParseKeyring). It warns through warn when the file is
// readable by group or others.
func LoadKeyring(path string, warn func(msg string)) ([][]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 && warn != nil {
		warn(fmt.Sprintf("gossip keyring %s is mode %v; chmod 600 it so only the daemon can read it", path, fi.Mode().Perm()))
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	keys, err := ParseKeyring(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return keys, nil
}
