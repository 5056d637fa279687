package dataplane

import (
	"fmt"
	"slices"
	"strings"
	"time"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

type routeTable struct {
	name  string
	exact map[string]*virtualHost
	// suffix holds "*.example.com"-style domains as ".example.com", prefix "foo.*" as "foo.",
	// longest first (Envoy's order).
	suffix, prefix []wildcard
	any            *virtualHost
	proto          *route.RouteConfiguration
	// internalOnly are removed from requests that are not internal (canonical names).
	internalOnly []string
	// requestAdd are set on every request routed by this table, after internalOnly are removed;
	// responseRemove are removed from every upstream response (canonical names).
	requestAdd     []headerToSet
	responseRemove []string
}

type wildcard struct {
	s  string
	vh *virtualHost
}

type virtualHost struct {
	name   string
	routes []*routeEntry
	rbac   *perRouteRBAC // nil: the listener's filter config applies
	// transcoder is the virtual host's gRPC-JSON transcoder config; nil: the filter's own.
	transcoder *transcoderConfig
}

// perRouteRBAC overrides the HTTP RBAC filter for a virtual host or route.
type perRouteRBAC struct {
	engine *rbacEngine
}

type routeEntry struct {
	name string
	// prefix is matched case-sensitively: the control plane emits prefix matches only, with
	// case_sensitive unset (true).
	prefix     string
	cluster    string
	timeout    time.Duration // 0: none
	rbac       *perRouteRBAC
	transcoder *transcoderConfig
	// connectRetries: how often a request whose connection failed is tried on another endpoint.
	connectRetries int
	// resetRetry: retry_on has reset, so a request whose upstream connection was reset before
	// a response is tried again too (inbound VM clusters); retryMethods, when set, is the
	// retriable_request_headers :method condition every retry needs.
	resetRetry   bool
	retryMethods func(string) bool
}

// lookup finds the virtual host for a Host header, Envoy's way: exact, then the longest
// suffix wildcard, then the longest prefix wildcard, then "*".
func (t *routeTable) lookup(host string) *virtualHost {
	h := asciiLower(host)
	if vh := t.exact[h]; vh != nil {
		return vh
	}
	for _, w := range t.suffix {
		if len(h) > len(w.s) && strings.HasSuffix(h, w.s) {
			return w.vh
		}
	}
	for _, w := range t.prefix {
		if len(h) > len(w.s) && strings.HasPrefix(h, w.s) {
			return w.vh
		}
	}
	return t.any
}

func (vh *virtualHost) match(path string) *routeEntry {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	for _, r := range vh.routes {
		if strings.HasPrefix(path, r.prefix) {
			return r
		}
	}
	return nil
}

func parseRouteConfig(rc *route.RouteConfiguration) (*routeTable, error) {
	name := rc.GetName()
	t := &routeTable{name: name, exact: map[string]*virtualHost{}, proto: rc}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("route configuration %q: %s", name, fmt.Sprintf(format, args...))
	}
	if len(rc.GetTypedPerFilterConfig()) > 0 {
		return nil, fail("typed_per_filter_config: not supported at route configuration level; set it on virtual hosts")
	}
	if len(rc.GetResponseHeadersToAdd()) > 0 || len(rc.GetRequestHeadersToRemove()) > 0 {
		return nil, fail("response_headers_to_add and request_headers_to_remove: not supported; %s", headerMutationsSupported)
	}
	internalOnly, err := parseInternalOnly(rc.GetInternalOnlyHeaders(), "internal_only_headers")
	if err != nil {
		return nil, fail("%v", err)
	}
	t.internalOnly = internalOnly
	if t.requestAdd, err = parseHeadersToAdd(rc.GetRequestHeadersToAdd(), "request_headers_to_add"); err != nil {
		return nil, fail("%v", err)
	}
	if t.responseRemove, err = parseHeaderNames(rc.GetResponseHeadersToRemove(), "response_headers_to_remove"); err != nil {
		return nil, fail("%v", err)
	}
	seen := map[string]string{}
	for i, v := range rc.GetVirtualHosts() {
		vf := fmt.Sprintf("virtual_hosts[%d] (%s)", i, v.GetName())
		vh := &virtualHost{name: v.GetName()}
		if v.GetRequireTls() != route.VirtualHost_NONE {
			return nil, fail("%s.require_tls: not supported", vf)
		}
		//lint:ignore SA1019 read only to refuse it
		if v.GetRetryPolicy() != nil || v.GetHedgePolicy() != nil || len(v.GetRateLimits()) > 0 || v.GetCors() != nil {
			return nil, fail("%s: retry, hedge, rate limit and CORS policies are not supported", vf)
		}
		if len(v.GetRequestHeadersToAdd()) > 0 || len(v.GetResponseHeadersToAdd()) > 0 || len(v.GetRequestHeadersToRemove()) > 0 || len(v.GetResponseHeadersToRemove()) > 0 {
			return nil, fail("%s: header manipulation is not supported here; %s", vf, headerMutationsSupported)
		}
		pr, tc, err := parsePerFilter(v.GetTypedPerFilterConfig(), vf+".typed_per_filter_config")
		if err != nil {
			return nil, fail("%v", err)
		}
		vh.rbac, vh.transcoder = pr, tc
		for j, r := range v.GetRoutes() {
			re, err := parseRoute(r, fmt.Sprintf("%s.routes[%d]", vf, j))
			if err != nil {
				return nil, fail("%v", err)
			}
			vh.routes = append(vh.routes, re)
		}
		if len(v.GetDomains()) == 0 {
			return nil, fail("%s.domains: empty", vf)
		}
		for _, d := range v.GetDomains() {
			d = asciiLower(d)
			if prev, dup := seen[d]; dup {
				return nil, fail("%s.domains: %q is also a domain of virtual host %q; domains must be unique", vf, d, prev)
			}
			seen[d] = v.GetName()
			switch {
			case d == "*":
				t.any = vh
			case strings.HasPrefix(d, "*"):
				t.suffix = append(t.suffix, wildcard{d[1:], vh})
			case strings.HasSuffix(d, "*"):
				t.prefix = append(t.prefix, wildcard{d[:len(d)-1], vh})
			case strings.Contains(d, "*"):
				return nil, fail("%s.domains: %q: a wildcard must be the first or last character", vf, d)
			default:
				t.exact[d] = vh
			}
		}
	}
	byLen := func(a, b wildcard) int { return len(b.s) - len(a.s) }
	slices.SortStableFunc(t.suffix, byLen)
	slices.SortStableFunc(t.prefix, byLen)
	return t, nil
}

func parsePerFilter(m map[string]*anypb.Any, field string) (*perRouteRBAC, *transcoderConfig, error) {
	var out *perRouteRBAC
	var tc *transcoderConfig
	for key, a := range m {
		f := field + "[" + key + "]"
		msg, err := unpack(a, f)
		if err != nil {
			return nil, nil, err
		}
		if _, ok := msg.(*route.FilterConfig); ok {
			return nil, nil, fmt.Errorf("%s: %s is not supported by the built-in data plane; send the filter's own per-route config", f, fullName(msg))
		}
		if fullName(msg) == nameTranscoder {
			if tc, err = parseTranscoder(msg.(*transcoderpb.GrpcJsonTranscoder), f); err != nil {
				return nil, nil, err
			}
			continue
		}
		if fullName(msg) != nameRBACRoute {
			return nil, nil, fmt.Errorf("%s: per-filter config %s is not supported; only %s and %s", f, fullName(msg), nameRBACRoute, nameTranscoder)
		}
		// The control plane overrides the listener's empty RBAC config with rules, never disables it.
		pr := msg.(*rbachttp.RBACPerRoute)
		if pr.GetRbac().GetRules() == nil {
			return nil, nil, fmt.Errorf("%s.rbac.rules: required; the built-in data plane does not support RBACPerRoute without rules", f)
		}
		if pr.GetRbac().GetMatcher() != nil || pr.GetRbac().GetShadowRules() != nil || pr.GetRbac().GetShadowMatcher() != nil {
			return nil, nil, fmt.Errorf("%s.rbac: matcher-based and shadow RBAC are not supported; use rules", f)
		}
		eng, err := parseRBAC(pr.GetRbac().GetRules(), f+".rbac.rules")
		if err != nil {
			return nil, nil, err
		}
		out = &perRouteRBAC{engine: eng}
	}
	return out, tc, nil
}

func parseRoute(r *route.Route, field string) (*routeEntry, error) {
	re := &routeEntry{name: r.GetName()}
	m := r.GetMatch()
	ps, ok := m.GetPathSpecifier().(*route.RouteMatch_Prefix)
	if !ok {
		return nil, fmt.Errorf("%s.match: %T is not supported by the built-in data plane; use prefix", field, m.GetPathSpecifier())
	}
	re.prefix = ps.Prefix
	if cs := m.GetCaseSensitive(); cs != nil && !cs.GetValue() {
		return nil, fmt.Errorf("%s.match.case_sensitive: false is not supported by the built-in data plane; leave it unset", field)
	}
	if len(m.GetHeaders()) > 0 || len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil || len(m.GetDynamicMetadata()) > 0 || m.GetTlsContext() != nil {
		return nil, fmt.Errorf("%s.match: header, query, gRPC, runtime, metadata and TLS matches are not supported", field)
	}
	a, ok := r.GetAction().(*route.Route_Route)
	if !ok {
		return nil, fmt.Errorf("%s: action %T is not supported; only route (to a cluster)", field, r.GetAction())
	}
	ra := a.Route
	c, ok := ra.GetClusterSpecifier().(*route.RouteAction_Cluster)
	if !ok || c.Cluster == "" {
		return nil, fmt.Errorf("%s.route: cluster is required (weighted_clusters and cluster_header are not supported)", field)
	}
	re.cluster = c.Cluster
	re.timeout = duration(ra.GetTimeout(), 15*time.Second)
	switch {
	case ra.GetPrefixRewrite() != "" || ra.GetRegexRewrite() != nil || ra.GetPathRewrite() != "":
		return nil, fmt.Errorf("%s.route: path rewrites are not supported", field)
	case ra.GetHostRewriteSpecifier() != nil:
		return nil, fmt.Errorf("%s.route: host rewrites are not supported", field)
	case ra.GetHedgePolicy() != nil || len(ra.GetRequestMirrorPolicies()) > 0:
		return nil, fmt.Errorf("%s.route: hedge and mirror policies are not supported", field)
	case len(ra.GetHashPolicy()) > 0 || ra.GetMetadataMatch() != nil:
		return nil, fmt.Errorf("%s.route: hash policies and metadata matches are not supported", field)
	case len(r.GetRequestHeadersToAdd()) > 0 || len(r.GetResponseHeadersToAdd()) > 0 || len(r.GetRequestHeadersToRemove()) > 0 || len(r.GetResponseHeadersToRemove()) > 0:
		return nil, fmt.Errorf("%s: header manipulation is not supported here; %s", field, headerMutationsSupported)
	}
	if rp := ra.GetRetryPolicy(); rp != nil {
		n, err := parseRetryPolicy(rp, field+".route.retry_policy")
		if err != nil {
			return nil, err
		}
		re.connectRetries = n
		if re.resetRetry, re.retryMethods, err = parseRetryConditions(rp, field+".route.retry_policy"); err != nil {
			return nil, err
		}
	}
	pr, tc, err := parsePerFilter(r.GetTypedPerFilterConfig(), field+".typed_per_filter_config")
	if err != nil {
		return nil, err
	}
	re.rbac, re.transcoder = pr, tc
	return re, nil
}

// parseRetryPolicy accepts the one retry policy the built-in data plane carries out: connection
// failures retried on another endpoint (previous_hosts), nothing else; it returns num_retries.
func parseRetryPolicy(rp *route.RetryPolicy, field string) (int, error) {
	for _, on := range strings.Split(rp.GetRetryOn(), ",") {
		if on = strings.TrimSpace(on); on != "connect-failure" && on != "reset" {
			return 0, fmt.Errorf("%s.retry_on: %q is not supported; the built-in data plane retries connect-failure and reset only", field, on)
		}
	}
	n := 1 // Envoy's default num_retries
	if v := rp.GetNumRetries(); v != nil {
		n = int(v.GetValue())
	}
	for i, p := range rp.GetRetryHostPredicate() {
		if p.GetName() != "envoy.retry_host_predicates.previous_hosts" {
			return 0, fmt.Errorf("%s.retry_host_predicate[%d]: %s is not supported; use envoy.retry_host_predicates.previous_hosts", field, i, p.GetName())
		}
	}
	if rp.GetPerTryTimeout() != nil || rp.GetRetryBackOff() != nil || len(rp.GetRetriableStatusCodes()) > 0 || len(rp.GetRetriableHeaders()) > 0 || rp.GetRetryPriority() != nil {
		return 0, fmt.Errorf("%s: only retry_on, num_retries, retry_host_predicate, retriable_request_headers (:method) and host_selection_retry_max_attempts are supported", field)
	}
	return n, nil
}

// parseRetryConditions reads retry_on's reset and a retriable_request_headers condition on
// :method (all of them must match for a request to be retried, as in Envoy).
func parseRetryConditions(rp *route.RetryPolicy, field string) (bool, func(string) bool, error) {
	reset := slices.Contains(strings.Split(strings.ReplaceAll(rp.GetRetryOn(), " ", ""), ","), "reset")
	var ms []func(string) bool
	for i, h := range rp.GetRetriableRequestHeaders() {
		f := fmt.Sprintf("%s.retriable_request_headers[%d]", field, i)
		if h.GetName() != ":method" || h.GetInvertMatch() || h.GetStringMatch() == nil {
			return false, nil, fmt.Errorf("%s: only a string_match on :method is supported", f)
		}
		m, err := stringMatcher(h.GetStringMatch())
		if err != nil {
			return false, nil, fmt.Errorf("%s.string_match: %v", f, err)
		}
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return reset, nil, nil
	}
	return reset, func(method string) bool {
		for _, m := range ms {
			if !m(method) {
				return false
			}
		}
		return true
	}, nil
}
