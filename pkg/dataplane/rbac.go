package dataplane

import (
	"fmt"
	"net/netip"
	"slices"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
)

// rbacEngine evaluates Envoy RBAC rules on the peer's address and, on TLS connections (the
// reverse direction's inbound listener), the principal its certificate proves. Rules that need
// anything else are rejected when parsed.
type rbacEngine struct {
	deny     bool // action DENY; otherwise ALLOW
	policies []rbacPolicy
}

type rbacPolicy struct {
	name       string
	principals []principal
}

// principal reports whether a peer matches.
type principal func(peerID) bool

// peerID is what RBAC knows of a peer: its address and, after a TLS handshake with a client
// certificate, the certificate's URI SANs (Envoy's authenticated principal_name).
type peerID struct {
	addr netip.Addr
	uris []string
}

// allowed reports whether a peer at addr passes the rules.
func (e *rbacEngine) allowed(addr netip.Addr) bool { return e.allowedPeer(peerID{addr: addr}) }

// allowedPeer reports whether a peer passes the rules.
func (e *rbacEngine) allowedPeer(addr peerID) bool {
	if e == nil {
		return true
	}
	matched := false
	for _, p := range e.policies {
		for _, pr := range p.principals {
			if pr(addr) {
				matched = true
				break
			}
		}
		if matched {
			break
		}
	}
	if e.deny {
		return !matched
	}
	return matched
}

// parseRBAC compiles rules; field is the path used in error messages.
func parseRBAC(r *rbacconfig.RBAC, field string) (*rbacEngine, error) {
	if r == nil {
		return nil, nil
	}
	e := &rbacEngine{}
	if r.GetAction() != rbacconfig.RBAC_ALLOW {
		return nil, fmt.Errorf("%s.action: %s is not supported; use ALLOW", field, r.GetAction())
	}
	if r.GetAuditLoggingOptions() != nil {
		return nil, fmt.Errorf("%s.audit_logging_options: not supported", field)
	}
	{
		names := make([]string, 0, len(r.GetPolicies()))
		for n := range r.GetPolicies() {
			names = append(names, n)
		}
		slices.Sort(names)
		for _, n := range names {
			p := r.GetPolicies()[n]
			pf := fmt.Sprintf("%s.policies[%s]", field, n)
			if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
				return nil, fmt.Errorf("%s.condition: CEL conditions are not supported", pf)
			}
			for i, perm := range p.GetPermissions() {
				if err := checkPermission(perm, fmt.Sprintf("%s.permissions[%d]", pf, i)); err != nil {
					return nil, err
				}
			}
			pol := rbacPolicy{name: n}
			for i, pr := range p.GetPrincipals() {
				m, err := parsePrincipal(pr, fmt.Sprintf("%s.principals[%d]", pf, i))
				if err != nil {
					return nil, err
				}
				pol.principals = append(pol.principals, m)
			}
			// A policy matches when any permission and any principal match; every supported
			// permission matches everything, so a policy without permissions never matches.
			if len(p.GetPermissions()) == 0 {
				pol.principals = nil
			}
			e.policies = append(e.policies, pol)
		}
	}
	return e, nil
}

func checkPermission(p *rbacconfig.Permission, field string) error {
	switch r := p.GetRule().(type) {
	case *rbacconfig.Permission_Any:
		if !r.Any {
			return fmt.Errorf("%s.any: must be true", field)
		}
		return nil
	default:
		return fmt.Errorf("%s: permission %T is not supported by the built-in data plane; only any: true", field, p.GetRule())
	}
}

func parsePrincipal(p *rbacconfig.Principal, field string) (principal, error) {
	// The control plane names callers by peer address (plain listeners) or certificate
	// (the reverse direction), nothing else.
	switch id := p.GetIdentifier().(type) {
	case *rbacconfig.Principal_DirectRemoteIp:
		return cidrPrincipal(id.DirectRemoteIp.GetAddressPrefix(), id.DirectRemoteIp.GetPrefixLen().GetValue(), id.DirectRemoteIp.GetPrefixLen() != nil, field+".direct_remote_ip")
	case *rbacconfig.Principal_Authenticated_:
		// Envoy matches principal_name against the certificate's URI SANs (then DNS SANs and
		// the subject, which mesh certificates leave empty).
		pn := id.Authenticated.GetPrincipalName()
		if pn == nil {
			return nil, fmt.Errorf("%s.authenticated.principal_name: required", field)
		}
		m, err := stringMatcher(pn)
		if err != nil {
			return nil, fmt.Errorf("%s.authenticated.principal_name: %v", field, err)
		}
		return func(a peerID) bool {
			for _, u := range a.uris {
				if m(u) {
					return true
				}
			}
			return false
		}, nil
	default:
		return nil, fmt.Errorf("%s: principal %T is not supported by the built-in data plane; use direct_remote_ip or authenticated", field, p.GetIdentifier())
	}
}

func cidrPrincipal(addr string, bits uint32, hasBits bool, field string) (principal, error) {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("%s.address_prefix: %q is not an IP address", field, addr)
	}
	ip = ip.Unmap()
	if !hasBits {
		bits = uint32(ip.BitLen())
	}
	pfx, err := ip.Prefix(int(bits))
	if err != nil || int(bits) > ip.BitLen() {
		return nil, fmt.Errorf("%s.prefix_len: %d is not valid for %s", field, bits, addr)
	}
	return func(a peerID) bool { return pfx.Contains(a.addr.Unmap()) }, nil
}

// parseSourceRanges compiles a filter chain's source_prefix_ranges into an allow list; none
// matches every peer (nil).
func parseSourceRanges(ranges []*core.CidrRange, field string) (*rbacEngine, error) {
	if len(ranges) == 0 {
		return nil, nil
	}
	pol := rbacPolicy{name: "source_prefix_ranges"}
	for i, r := range ranges {
		p, err := cidrPrincipal(r.GetAddressPrefix(), r.GetPrefixLen().GetValue(), r.GetPrefixLen() != nil, fmt.Sprintf("%s[%d]", field, i))
		if err != nil {
			return nil, err
		}
		pol.principals = append(pol.principals, p)
	}
	return &rbacEngine{policies: []rbacPolicy{pol}}, nil
}
