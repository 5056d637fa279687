package peers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Keys of the fleet store. Operator entries and discovered services are both whole
// catalog.Service values keyed by host; operator entries take priority over discovered ones for
// the same host (the daemon merges the operator source first).
//
//	op/<host>                   a service applied by an operator (fwdproxy apply)
//	disc/<source>/<host>        a service found by discovery source <source> on the leader
//	ready/<source>              source <source> has reported at least once (value {})
//
// <source> is the path-escaped source name (e.g. file:%2Fetc%2Ffwdproxy%2Fcatalog.yaml).
const (
	prefixOperator   = "op/"
	prefixDiscovered = "disc/"
	prefixReady      = "ready/"
)

// OperatorKey is the store key of an operator's entry for host.
func OperatorKey(host string) string { return prefixOperator + host }

// DiscoveredKey is the store key of a service found by a discovery source.
func DiscoveredKey(source, host string) string {
	return prefixDiscovered + url.PathEscape(source) + "/" + host
}

func discoveredPrefix(source string) string { return prefixDiscovered + url.PathEscape(source) + "/" }

func readyKey(source string) string { return prefixReady + url.PathEscape(source) }

var emptyObject = json.RawMessage("{}")

// CatalogValidator accepts only the keys above, with values that pass the catalog's own rules;
// it returns the normalized service re-encoded, so equal services are equal bytes everywhere.
func CatalogValidator(opts catalog.Options) Validator {
	return func(key string, value []byte) ([]byte, error) {
		var host string
		switch {
		case strings.HasPrefix(key, prefixReady):
			if !bytes.Equal(bytes.TrimSpace(value), emptyObject) {
				return nil, fmt.Errorf("%s: value must be {}", key)
			}
			return emptyObject, nil
		case strings.HasPrefix(key, prefixOperator):
			host = key[len(prefixOperator):]
		case strings.HasPrefix(key, prefixDiscovered):
			rest := key[len(prefixDiscovered):]
			i := strings.LastIndexByte(rest, '/')
			if i <= 0 {
				return nil, fmt.Errorf("%s: key must be disc/<source>/<host>", key)
			}
			host = rest[i+1:]
		default:
			return nil, fmt.Errorf("%s: unknown key kind (want op/, disc/ or ready/)", key)
		}
		s, err := decodeService(value, opts)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		if s.Host != host {
			return nil, fmt.Errorf("%s: service host %q does not match its key", key, s.Host)
		}
		return json.Marshal(s)
	}
}

// decodeService parses and validates one service with the catalog's rules.
func decodeService(value []byte, opts catalog.Options) (catalog.Service, error) {
	var s catalog.Service
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("not a service: %v", err)
	}
	c := catalog.Catalog{Services: []catalog.Service{s}}
	if err := c.Validate(opts); err != nil {
		return s, err
	}
	c.Normalize()
	return c.Services[0], nil
}

// servicesOf decodes the live services under prefix (already validated when stored).
func servicesOf(entries []Entry) *catalog.Catalog {
	c := &catalog.Catalog{Services: make([]catalog.Service, 0, len(entries))}
	for _, e := range entries {
		var s catalog.Service
		if err := json.Unmarshal(e.Value, &s); err == nil {
			c.Services = append(c.Services, s)
		}
	}
	c.Normalize()
	return c
}
