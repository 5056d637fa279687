package controlplane

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/fwdproxy/fwdproxy/internal/strictyaml"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Translation is best effort, as in Envoy Gateway's translator: a service that cannot be placed
// is left out and reported with why, and everything else is still built, so one bad or not yet
// reachable service never holds back every other service's changes. What is left out is decided
// by the inputs alone (in catalog order: the first by host keeps what two services claim), so
// every peer with the same catalog and gateways leaves out the same services.

// Skip reasons: the values of the reason label of fwdproxy_translation_services_skipped.
const (
	// SkipInvalid: the service breaks a catalog rule by itself (a bad host, port, identity or
	// CIDR), as a catalog that slipped past validation might (an older peer's entry).
	SkipInvalid = "invalid"
	// SkipConflict: the service claims a host name or a port that a service earlier in the
	// catalog already holds (a TCP port twice, a TCP port also used for HTTP, a host twice).
	SkipConflict = "conflict"
	// SkipNoGatewayAddress: none of the gateways that reach the service has a known address yet
	// (a DNS name not resolved yet, a discovered gateway without a load-balancer address).
	SkipNoGatewayAddress = "no_gateway_address"
)

// SkipReasons lists every skip reason, for metrics that report each one (zero included).
var SkipReasons = []string{SkipConflict, SkipInvalid, SkipNoGatewayAddress}

// SkippedService is a service that translation left out, and why.
type SkippedService struct {
	Host   string `json:"host"`
	Reason string `json:"reason"`
	// Detail says what is wrong and, where it can, what to change.
	Detail string `json:"detail"`
}

func (s SkippedService) String() string { return s.Host + ": " + s.Reason + ": " + s.Detail }

// skip records a service left out.
func (r *Resources) skip(host, reason, detail string) {
	r.Skipped = append(r.Skipped, SkippedService{Host: host, Reason: reason, Detail: detail})
}

// sortSkipped orders the list by host, then reason, so it compares equal across peers.
func (r *Resources) sortSkipped() {
	slices.SortFunc(r.Skipped, func(a, b SkippedService) int {
		if c := strings.Compare(a.Host, b.Host); c != 0 {
			return c
		}
		return strings.Compare(a.Reason, b.Reason)
	})
}

// placeable returns the services that pass the catalog's rules, and records the others. A
// service is first checked alone (invalid), then the valid ones together (conflict), so a service
// left out for its own faults claims no host or port that a valid one needs. The common case, a
// catalog that passed validation, costs one check, and none for one that discovery.Merge
// checked (the daemon's).
func placeable(cat *catalog.Catalog, res *Resources) []catalog.Service {
	if cat.Checked || len(cat.Problems(catalog.Options{})) == 0 {
		return cat.Services
	}
	valid := make([]catalog.Service, 0, len(cat.Services))
	for _, s := range cat.Services {
		alone := &catalog.Catalog{Services: []catalog.Service{s}}
		if p := alone.Problems(catalog.Options{}); len(p) > 0 {
			res.skip(s.Host, SkipInvalid, describe(p, alone.Services))
			continue
		}
		valid = append(valid, s)
	}
	together := &catalog.Catalog{Services: valid}
	byService := map[int]strictyaml.Problems{}
	for _, p := range together.Problems(catalog.Options{}) {
		if i, ok := serviceIndex(p.Field); ok {
			byService[i] = append(byService[i], p)
		}
	}
	if len(byService) == 0 {
		return valid
	}
	out := make([]catalog.Service, 0, len(valid))
	for i, s := range valid {
		if p, bad := byService[i]; bad {
			res.skip(s.Host, SkipConflict, describe(p, valid))
			continue
		}
		out = append(out, s)
	}
	return out
}

var (
	serviceRef   = regexp.MustCompile(`services\[(\d+)\]\.?`)
	serviceField = regexp.MustCompile(`services\[(\d+)\](?:\.([A-Za-z]+(?:\[\d+\])?))?`)
)

// serviceIndex is i of a field path "services[i]...".
func serviceIndex(field string) (int, bool) {
	m := serviceRef.FindStringSubmatch(field)
	if m == nil || !strings.HasPrefix(field, "services[") {
		return 0, false
	}
	i, err := strconv.Atoi(m[1])
	return i, err == nil
}

// describe joins a service's problems without the catalog positions, which mean nothing outside
// the merged catalog: "ports[0].number: ..."; another service named by position is named by host.
func describe(problems strictyaml.Problems, services []catalog.Service) string {
	msgs := make([]string, 0, len(problems))
	for _, p := range problems {
		field := serviceRef.ReplaceAllString(p.Field, "")
		msg := serviceField.ReplaceAllStringFunc(p.Message, func(ref string) string {
			m := serviceField.FindStringSubmatch(ref)
			i, err := strconv.Atoi(m[1])
			switch {
			case err != nil || i >= len(services):
				return ref
			case m[2] == "" || m[2] == "host":
				return services[i].Host
			default:
				return services[i].Host + "'s " + m[2]
			}
		})
		if field == "" {
			msgs = append(msgs, msg)
		} else {
			msgs = append(msgs, field+": "+msg)
		}
	}
	return strings.Join(msgs, "; ")
}

// portConflict says why svc cannot take its ports given those already placed: a TCP port serves
// one service, and a port is either TCP or HTTP. Catalog validation refuses both; this keeps a
// catalog that slipped past it from emitting two listeners for one port.
func portConflict(svc *catalog.Service, httpPorts map[uint32]bool, tcpPorts map[uint32]string) error {
	for _, p := range svc.Ports {
		owner, tcpTaken := tcpPorts[p.Number]
		switch {
		case !p.Protocol.IsHTTP() && httpPorts[p.Number]:
			return fmt.Errorf("port %d is TCP but another service uses it for HTTP", p.Number)
		case tcpTaken && !p.Protocol.IsHTTP():
			return fmt.Errorf("TCP port %d is already served by %s", p.Number, owner)
		case tcpTaken:
			return fmt.Errorf("HTTP port %d is already the TCP port of %s", p.Number, owner)
		}
	}
	return nil
}

func quoteAll(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = strconv.Quote(n)
	}
	return strings.Join(q, ", ")
}
