package dataplane

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	uuidrid "github.com/envoyproxy/go-control-plane/envoy/extensions/request_id/uuid/v3"
	"golang.org/x/net/http/httpguts"
)

// Request headers as Envoy's HTTP connection manager treats them (conn_manager_utility.cc
// mutateRequestHeaders and mutateXfccRequestHeader, the UUID request ID extension, and the router,
// which consumes its control headers). What a client may set and what it may not depends on
// whether Envoy deems the request internal: only a request whose one X-Forwarded-For address
// (after use_remote_address appended the peer) is an internal address. Every other request is
// external, and with use_remote_address it is also an edge request: this proxy is the first one
// inside the trusted network. The built-in data plane acts on none of the x-envoy-* control
// headers (retries and timeouts come only from the route), but it forwards exactly what Envoy
// forwards, so a service behind it sees the same request whichever data plane carried it.

// routerConsumed are the headers Envoy's router reads and removes before forwarding a request,
// internal or not.
var routerConsumed = []string{
	"X-Envoy-Max-Retries",
	"X-Envoy-Retry-On",
	"X-Envoy-Retry-Grpc-On",
	"X-Envoy-Retriable-Status-Codes",
	"X-Envoy-Retriable-Header-Names",
	"X-Envoy-Upstream-Rq-Timeout-Ms",
	"X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms",
	"X-Envoy-Upstream-Rq-Timeout-Alt-Response",
	"X-Envoy-Upstream-Stream-Duration-Ms",
	"X-Envoy-Upstream-Alt-Stat-Name",
	"X-Envoy-Hedge-On-Per-Try-Timeout",
}

// externalCleaned are removed, besides routerConsumed, from every request that is not internal
// (cleanInternalHeaders).
var externalCleaned = []string{
	"X-Envoy-Expected-Rq-Timeout-Ms",
	"X-Envoy-Force-Trace",
	"X-Envoy-Ip-Tags",
	"X-Envoy-Original-Url",
}

// edgeCleaned are removed, besides those, from an edge request.
var edgeCleaned = []string{
	"X-Envoy-Decorator-Operation",
	"X-Envoy-Downstream-Service-Cluster",
	"X-Envoy-Downstream-Service-Node",
	"X-Envoy-Original-Path",
}

const (
	hdrXFF             = "X-Forwarded-For"
	hdrXFP             = "X-Forwarded-Proto"
	hdrXFCC            = "X-Forwarded-Client-Cert"
	hdrRequestID       = "X-Request-Id"
	hdrEnvoyInternal   = "X-Envoy-Internal"
	hdrExternalAddress = "X-Envoy-External-Address"
)

// legacyInternal is what Envoy deems internal when internal_address_config is present but lists no
// cidr_ranges (Network::Utility::isInternalAddress): RFC 1918, 127.0.0.1, fd00::/8 and ::1. Without
// internal_address_config no address is internal (Envoy 1.33 and later).
var legacyInternal = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("127.0.0.1/32"),
	netip.MustParsePrefix("fd00::/8"),
	netip.MustParsePrefix("::1/128"),
}

// requestHeaders is the part of an HTTP connection manager's configuration that shapes the
// request headers sent upstream.
type requestHeaders struct {
	useRemoteAddress bool
	skipXFFAppend    bool
	internal         []netip.Prefix // addresses deemed internal; none when empty
	generateID       bool
	preserveID       bool
	xfcc             hcm.HttpConnectionManager_ForwardClientCertDetails
}

func (h *requestHeaders) isInternal(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range h.internal {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// goStripped are the headers Go's ReverseProxy removes from the upstream request before Rewrite.
// Envoy passes Forwarded and X-Forwarded-Host on untouched and sets the others as sanitize does.
var goStripped = []string{hdrXFF, hdrXFP, "X-Forwarded-Host", "Forwarded"}

// sanitize turns out, the headers of a request from peer, into those Envoy sends upstream
// (hop-by-hop headers aside). peerStr is peer as text (formatted once per connection);
// internalOnly are the route configuration's internal_only_headers.
func (h *requestHeaders) sanitize(out http.Header, peer netip.Addr, peerStr string, internalOnly []string) {
	// Envoy joins repeated headers with a comma, without a space.
	xff := strings.Join(out.Values(hdrXFF), ",")
	// The address internal/external is decided on, and whether it can be trusted: the peer when
	// no X-Forwarded-For came in, or the only address in it when the peer is not used.
	remote, trusted := peer, xff == ""
	if h.useRemoteAddress {
		if !h.skipXFFAppend && peer.IsValid() {
			if xff != "" {
				xff += ","
			}
			xff += peerStr
		}
	} else {
		remote, trusted = netip.Addr{}, false
		if xff != "" && !strings.Contains(xff, ",") {
			remote, _ = netip.ParseAddr(strings.TrimSpace(xff))
			trusted = remote.IsValid()
		}
	}
	if xff != "" {
		out[hdrXFF] = []string{xff}
	}
	// With use_remote_address the scheme is the downstream connection's (always plain text here),
	// whatever the client claimed; otherwise it is set only when the client sent none.
	if v := out[hdrXFP]; h.useRemoteAddress || len(v) == 0 || v[0] == "" {
		out[hdrXFP] = []string{"http"}
	}

	internal := trusted && remote.IsValid() && h.isInternal(remote)
	edge := !internal && h.useRemoteAddress
	// One pass over the request's few headers rather than a lookup of every name that may go
	// (every name here is canonical, as the request's are).
	keepXFCC := h.xfcc == hcm.HttpConnectionManager_ALWAYS_FORWARD_ONLY
	for k := range out {
		switch cleanedClass[k] {
		case cleanAlways:
			delete(out, k)
		case cleanExternal:
			if !internal {
				delete(out, k)
			}
		case cleanEdge:
			if edge {
				delete(out, k)
			}
		case cleanXFCC:
			// Without TLS downstream there is no client certificate to forward: every mode but
			// ALWAYS_FORWARD_ONLY removes what the client sent (SANITIZE is the default).
			if !keepXFCC {
				delete(out, k)
			}
		}
	}
	if internal {
		out[hdrEnvoyInternal] = []string{"true"}
	} else {
		for _, k := range internalOnly {
			delete(out, k)
		}
	}
	if edge && remote.IsValid() {
		out[hdrExternalAddress] = []string{remote.String()}
	}
	if h.generateID && (len(out[hdrRequestID]) == 0 || edge && !h.preserveID) {
		out[hdrRequestID] = []string{requestID()}
	}
}

// What sanitize removes from a request: always (X-Envoy-Internal and the router's own), when
// it is not internal, when it is an edge request (besides the external ones), and the client's
// X-Forwarded-Client-Cert.
const (
	cleanNone uint8 = iota
	cleanAlways
	cleanExternal
	cleanEdge
	cleanXFCC
)

var cleanedClass = func() map[string]uint8 {
	m := map[string]uint8{hdrEnvoyInternal: cleanAlways, hdrXFCC: cleanXFCC}
	for class, list := range map[uint8][]string{cleanAlways: routerConsumed, cleanExternal: externalCleaned, cleanEdge: edgeCleaned} {
		for _, k := range list {
			m[k] = class
		}
	}
	return m
}()

var nameUUIDRequestID = fullName(&uuidrid.UuidRequestIdConfig{})

// parseRequestHeaders reads the HTTP connection manager's header settings, rejecting those that
// would make Envoy set or trust headers the built-in data plane does not.
func parseRequestHeaders(h *hcm.HttpConnectionManager, field string) (requestHeaders, error) {
	rh := requestHeaders{
		useRemoteAddress: h.GetUseRemoteAddress().GetValue(),
		skipXFFAppend:    h.GetSkipXffAppend(),
		generateID:       h.GetGenerateRequestId() == nil || h.GetGenerateRequestId().GetValue(),
		preserveID:       h.GetPreserveExternalRequestId(),
		xfcc:             h.GetForwardClientCertDetails(),
	}
	switch {
	case h.GetXffNumTrustedHops() != 0:
		return rh, fmt.Errorf("%s.xff_num_trusted_hops: not supported; the direct peer address is used", field)
	case len(h.GetOriginalIpDetectionExtensions()) > 0:
		return rh, fmt.Errorf("%s.original_ip_detection_extensions: not supported", field)
	case len(h.GetEarlyHeaderMutationExtensions()) > 0:
		return rh, fmt.Errorf("%s.early_header_mutation_extensions: not supported", field)
	case h.GetForwardClientCertMatcher() != nil:
		return rh, fmt.Errorf("%s.forward_client_cert_matcher: not supported; set forward_client_cert_details", field)
	case h.GetAppendXForwardedPort() || h.GetForwardProtoConfig() != nil || h.GetVia() != "":
		return rh, fmt.Errorf("%s: append_x_forwarded_port, forward_proto_config and via are not supported", field)
	case h.GetAlwaysSetRequestIdInResponse():
		return rh, fmt.Errorf("%s.always_set_request_id_in_response: not supported", field)
	}
	if ext := h.GetRequestIdExtension(); ext != nil {
		m, err := unpack(ext.GetTypedConfig(), field+".request_id_extension")
		if err != nil {
			return rh, err
		}
		if fullName(m) != nameUUIDRequestID {
			return rh, fmt.Errorf("%s.request_id_extension: %s is not supported; only %s", field, fullName(m), nameUUIDRequestID)
		}
	}
	if iac := h.GetInternalAddressConfig(); iac != nil {
		// unix_sockets does not matter: the built-in data plane listens on TCP only.
		if len(iac.GetCidrRanges()) == 0 {
			rh.internal = legacyInternal
		}
		for i, c := range iac.GetCidrRanges() {
			a, err := netip.ParseAddr(c.GetAddressPrefix())
			bits := int(c.GetPrefixLen().GetValue())
			if err != nil || bits > a.BitLen() {
				return rh, fmt.Errorf("%s.internal_address_config.cidr_ranges[%d]: %s/%d is not a CIDR range", field, i, c.GetAddressPrefix(), bits)
			}
			p, _ := a.Prefix(bits)
			rh.internal = append(rh.internal, p)
		}
	}
	return rh, nil
}

// parseInternalOnly reads a route configuration's internal_only_headers as canonical names.
func parseInternalOnly(names []string, field string) ([]string, error) {
	return parseHeaderNames(names, field)
}

// validHeaderName reports whether s is an HTTP field name (an RFC 9110 token).
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
		if !ok {
			return false
		}
	}
	return true
}

// headerToSet is one of a route configuration's request_headers_to_add, as the built-in data plane
// carries it out: a fixed value that replaces whatever the request has (canonical name).
type headerToSet struct {
	name, value string
}

// headerMutationsSupported says what the built-in data plane does with headers, for errors.
const headerMutationsSupported = "the built-in data plane supports, at route configuration level only, " +
	"request_headers_to_add with fixed values and append_action OVERWRITE_IF_EXISTS_OR_ADD, and response_headers_to_remove"

// parseHeadersToAdd reads request_headers_to_add, accepting only what Envoy would apply exactly as
// the built-in data plane does: fixed values (Envoy reads '%' as the start of a formatter
// command) that overwrite the request's own (OVERWRITE_IF_EXISTS_OR_ADD). Envoy's router adds
// them after the connection manager removed internal_only_headers, and so does ServeHTTP.
func parseHeadersToAdd(opts []*core.HeaderValueOption, field string) ([]headerToSet, error) {
	var out []headerToSet
	for i, o := range opts {
		f := fmt.Sprintf("%s[%d]", field, i)
		h := o.GetHeader()
		key, value := h.GetKey(), h.GetValue()
		switch {
		case !validHeaderName(key) || strings.EqualFold(key, "host"):
			return nil, fmt.Errorf("%s.header.key: %q cannot be added; use a header name other than Host and the pseudo-headers", f, key)
		case len(h.GetRawValue()) > 0:
			return nil, fmt.Errorf("%s.header.raw_value: not supported; set value", f)
		case value == "":
			return nil, fmt.Errorf("%s.header.value: empty; the built-in data plane adds fixed, non-empty values", f)
		case strings.ContainsRune(value, '%'):
			return nil, fmt.Errorf("%s.header.value: %q holds '%%', which Envoy reads as a substitution formatter; only fixed values are supported", f, value)
		case !httpguts.ValidHeaderFieldValue(value):
			return nil, fmt.Errorf("%s.header.value: not a valid header value", f)
		//lint:ignore SA1019 read only to refuse it with the replacement named
		case o.GetAppend() != nil:
			return nil, fmt.Errorf("%s.append: deprecated and not supported; set append_action OVERWRITE_IF_EXISTS_OR_ADD", f)
		case o.GetAppendAction() != core.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
			return nil, fmt.Errorf("%s.append_action: %s is not supported; %s", f, o.GetAppendAction(), headerMutationsSupported)
		}
		out = append(out, headerToSet{name: http.CanonicalHeaderKey(key), value: value})
	}
	return out, nil
}

// parseHeaderNames reads a list of header names (response_headers_to_remove) as canonical names.
func parseHeaderNames(names []string, field string) ([]string, error) {
	out := make([]string, 0, len(names))
	for i, n := range names {
		if !validHeaderName(n) {
			return nil, fmt.Errorf("%s[%d]: %q is not a header name", field, i, n)
		}
		out = append(out, http.CanonicalHeaderKey(n))
	}
	return out, nil
}
