package peers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"net/url"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Keys of the fleet store. Operator entries and discovered services are both whole
// catalog.Service values keyed by host; operator entries take priority over discovered ones for
// the same host (the daemon merges the operator source first).
//
//	op/<host>                   a service applied by an operator (fwdproxy apply)
//	disc/<source>/<host>        a service found by discovery source <source> on the leader
//	ready/<source>              source <source> has reported at least once (value {})
//	gw/<name>                   an east-west gateway discovered in Kubernetes by the leader
//
// <source> is the path-escaped source name (e.g. file:%2Fetc%2Ffwdproxy%2Fcatalog.yaml).
const (
	prefixOperator   = "op/"
	prefixDiscovered = "disc/"
	prefixReady      = "ready/"
	prefixGateway    = "gw/"
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
		case strings.HasPrefix(key, prefixGateway):
			g, err := decodeGateway(value)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", key, err)
			}
			if g.Name != key[len(prefixGateway):] {
				return nil, fmt.Errorf("%s: gateway name %q does not match its key", key, g.Name)
			}
			return json.Marshal(g)
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
			return nil, fmt.Errorf("%s: unknown key kind (want op/, disc/, ready/ or gw/)", key)
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

// Gateway is an east-west gateway found by discovery on the leader (its load balancer's
// addresses), shared so that every peer routes to it.
type Gateway struct {
	Name      string   `json:"name"`
	Network   string   `json:"network,omitempty"`
	Port      uint32   `json:"port"`
	Addresses []string `json:"addresses"`
}

func decodeGateway(value []byte) (Gateway, error) {
	var g Gateway
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&g); err != nil {
		return g, fmt.Errorf("not a gateway: %v", err)
	}
	if errs := validation.IsDNS1123Label(g.Name); len(errs) > 0 {
		return g, fmt.Errorf("gateway name %q is not a DNS label", g.Name)
	}
	if g.Port == 0 || g.Port > 65535 {
		return g, fmt.Errorf("gateway port %d is not 1-65535", g.Port)
	}
	if len(g.Addresses) > 64 {
		return g, fmt.Errorf("%d gateway addresses, over 64", len(g.Addresses))
	}
	for _, a := range g.Addresses {
		if _, err := netip.ParseAddr(a); err != nil && len(validation.IsDNS1123Subdomain(a)) > 0 {
			return g, fmt.Errorf("gateway address %q is neither an IP address nor a DNS name", a)
		}
	}
	g.Addresses = slices.Clone(g.Addresses)
	slices.Sort(g.Addresses)
	return g, nil
}

// SetGateway shares a discovered gateway with the fleet (the leader calls it).
func (n *Node) SetGateway(g Gateway) error {
	n.ownedMu.Lock()
	n.ownedGW[g.Name] = g
	n.ownedMu.Unlock()
	v, err := json.Marshal(g)
	if err != nil {
		return err
	}
	_, err = n.put(prefixGateway+g.Name, v)
	return err
}

// Gateways are the discovered gateways shared by the leader, by name.
func (n *Node) Gateways() []Gateway {
	var out []Gateway
	for _, e := range n.store.Live(prefixGateway) {
		var g Gateway
		if json.Unmarshal(e.Value, &g) == nil {
			out = append(out, g)
		}
	}
	return out
}
