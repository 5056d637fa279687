package dataplane

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	transcoderpb "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_json_transcoder/v3"
	"google.golang.org/protobuf/proto"

	"github.com/fwdproxy/fwdproxy/pkg/transcode"
)

// REST/JSON to gRPC transcoding, as Envoy's grpc_json_transcoder filter with the settings the
// control plane gives it (controlplane.TranscoderConfig); any other setting is refused, so what
// the built-in data plane accepts it serves as Envoy would.

var nameTranscoder = fullName(&transcoderpb.GrpcJsonTranscoder{})

// httpTranscoder is the filter in a connection manager's chain.
type httpTranscoder struct {
	name     string
	disabled bool              // only virtual hosts or routes with their own config transcode
	config   *transcoderConfig // nil: no services (Envoy's disabled transcoder)
}

// transcoderConfig is one descriptor set with its services and print options.
type transcoderConfig struct {
	codec      *transcode.Codec
	maxBody    int // request body bytes
	maxMessage int // response message bytes
}

// Parsing a descriptor set costs milliseconds; every route update would repeat it for each
// virtual host, so parsed configs are kept by content.
var transcoderCache struct {
	sync.Mutex
	m map[[32]byte]*transcoderConfig
}

const transcoderCacheMax = 256

func parseTranscoder(t *transcoderpb.GrpcJsonTranscoder, field string) (*transcoderConfig, error) {
	if len(t.GetServices()) == 0 {
		return nil, nil // Envoy builds no transcoder without services
	}
	if t.GetProtoDescriptor() != "" {
		return nil, fmt.Errorf("%s.proto_descriptor: a descriptor file is not supported; use proto_descriptor_bin", field)
	}
	po := t.GetPrintOptions()
	var unsupported []string
	check := func(bad bool, name string) {
		if bad {
			unsupported = append(unsupported, name)
		}
	}
	check(!t.GetAutoMapping(), "auto_mapping false")
	check(!t.GetConvertGrpcStatus(), "convert_grpc_status false")
	check(!t.GetIgnoreUnknownQueryParameters(), "ignore_unknown_query_parameters false")
	check(t.GetUrlUnescapeSpec() != transcoderpb.GrpcJsonTranscoder_ALL_CHARACTERS, "url_unescape_spec other than ALL_CHARACTERS")
	check(!t.GetQueryParamUnescapePlus(), "query_param_unescape_plus false")
	check(t.GetMatchIncomingRequestRoute(), "match_incoming_request_route")
	check(len(t.GetIgnoredQueryParameters()) > 0, "ignored_query_parameters")
	check(t.GetMatchUnregisteredCustomVerb(), "match_unregistered_custom_verb")
	check(t.GetRequestValidationOptions() != nil, "request_validation_options")
	check(t.GetCaseInsensitiveEnumParsing(), "case_insensitive_enum_parsing")
	check(t.GetCaptureUnknownQueryParameters(), "capture_unknown_query_parameters")
	check(po.GetAddWhitespace() || po.GetStreamNewlineDelimited() || po.GetStreamSseStyleDelimited(), "print_options add_whitespace and stream delimiters")
	if len(unsupported) > 0 {
		return nil, fmt.Errorf("%s: not supported by the built-in data plane: %s", field, strings.Join(unsupported, ", "))
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(t)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", field, err)
	}
	key := sha256.Sum256(b)
	transcoderCache.Lock()
	defer transcoderCache.Unlock()
	if c := transcoderCache.m[key]; c != nil {
		return c, nil
	}
	set, err := transcode.New(t.GetProtoDescriptorBin(), t.GetServices())
	if err != nil {
		return nil, fmt.Errorf("%s: %v", field, err)
	}
	c := &transcoderConfig{codec: transcode.NewCodec(set, transcode.PrintOptions{
		ProtoFieldNames: po.GetPreserveProtoFieldNames(),
		EmitDefaults:    po.GetAlwaysPrintPrimitiveFields(),
		EnumsAsInts:     po.GetAlwaysPrintEnumsAsInts(),
	})}
	c.maxBody, c.maxMessage = transcodeLimits(t)
	if transcoderCache.m == nil || len(transcoderCache.m) >= transcoderCacheMax {
		transcoderCache.m = map[[32]byte]*transcoderConfig{}
	}
	transcoderCache.m[key] = c
	return c, nil
}

// transcoderFor is the config that applies to a request: the route's, the virtual host's, or
// the filter's own unless disabled; nil when the chain has no transcoder.
func transcoderFor(hc *httpConfig, vh *virtualHost, re *routeEntry) *transcoderConfig {
	f := hc.transcoder
	switch {
	case f == nil:
		return nil
	case re.transcoder != nil:
		return re.transcoder
	case vh.transcoder != nil:
		return vh.transcoder
	case f.disabled:
		return nil
	}
	return f.config
}

// maxTranscodedBody bounds a JSON request body when the config sets no max_request_body_size;
// maxTranscodedMessage is Envoy's buffer limit (per_connection_buffer_limit_bytes, 1 MiB by
// default), which bounds an answer when the config sets neither size: past it Envoy answers
// 500 with errResponseTooLarge's text. The control plane sets both sizes
// (controlplane.MaxTranscodedBytes).
const (
	maxTranscodedBody    = 16 << 20
	maxTranscodedMessage = 1 << 20
)

// transcodeLimits are a config's request body and response message limits, as Envoy's
// transcoder applies them: it raises the stream's buffer limit to either size set, and a
// direction without its own size has that limit. (Envoy's request limit is on the bytes it holds
// unparsed, which a body in small reads never reaches: without a request size, the built-in data
// plane takes up to maxTranscodedBody.)
func transcodeLimits(t *transcoderpb.GrpcJsonTranscoder) (body, message int) {
	stream := max(maxTranscodedMessage, int(t.GetMaxRequestBodySize().GetValue()), int(t.GetMaxResponseBodySize().GetValue()))
	body, message = maxTranscodedBody, stream
	if m := t.GetMaxRequestBodySize(); m != nil {
		body = int(m.GetValue())
	}
	if m := t.GetMaxResponseBodySize(); m != nil {
		message = int(m.GetValue())
	}
	return body, message
}

//lint:ignore ST1005 Envoy's exact response text: it is sent as the body
var errResponseTooLarge = errors.New("Response not transcoded because the transcoder's internal buffer size exceeds the configured limit.")

// Request headers that describe the HTTP exchange, not the call: they do not become metadata.
var transcodeDropRequest = []string{"Content-Length", "Expect", "Content-Type", "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Te", "Trailer"}

// serveTranscoded answers r by calling the gRPC method its path and verb are bound to; false
// when no rule matches or the request is gRPC already, and it goes to the service untouched.
func (dp *DataPlane) serveTranscoded(w http.ResponseWriter, r *http.Request, tc *transcoderConfig, info *proxyInfo) bool {
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		return false
	}
	b, vars := tc.codec.Set.Match(r.Method, r.URL.EscapedPath())
	if b == nil {
		return false
	}
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(io.LimitReader(r.Body, int64(tc.maxBody)+1))
		if err != nil {
			dp.proxyError(w, r, &downstreamError{err: err})
			return true
		}
		if len(body) > tc.maxBody {
			info.flags = "DPE"
			localReply(w, http.StatusRequestEntityTooLarge, "Payload Too Large")
			return true
		}
	}
	msg, err := tc.codec.Request(b, vars, r.URL.RawQuery, body)
	if err != nil {
		var re *transcode.RequestError
		if !errors.As(err, &re) {
			dp.log.Debug("transcoding failed", "cluster", info.cluster.name, "error", err)
		}
		localReply(w, http.StatusBadRequest, err.Error())
		return true
	}
	frame := make([]byte, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:5], uint32(len(msg)))
	copy(frame[5:], msg)

	out := r.Clone(r.Context())
	out.Method = http.MethodPost
	out.URL = &url.URL{Scheme: "http", Host: info.cluster.name, Path: b.GRPCPath}
	out.RequestURI = ""
	out.Host = r.Host
	for _, k := range transcodeDropRequest {
		delete(out.Header, k)
	}
	out.Header.Set("Content-Type", "application/grpc")
	out.Header.Set("Te", "trailers")
	out.ContentLength = int64(len(frame))
	out.Body = io.NopCloser(bytes.NewReader(frame))
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(frame)), nil }
	out.Trailer = nil
	resp, err := info.cluster.RoundTrip(out)
	if err != nil {
		dp.proxyError(w, out, err)
		return true
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/grpc") {
		// Not a gRPC answer (a sidecar's 503, say): it goes to the client as it came.
		copyHeaders(w.Header(), resp.Header, info)
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
		return true
	}
	if b.Method.IsStreamingServer() {
		dp.transcodeStream(w, resp, tc, b, info)
	} else {
		dp.transcodeUnary(w, resp, tc, b, info)
	}
	return true
}

// copyHeaders copies the service's response headers for the client: its metadata, less what
// describes the gRPC exchange and the route's response_headers_to_remove.
func copyHeaders(dst, src http.Header, info *proxyInfo) {
	for k, v := range src {
		switch k {
		case "Content-Type", "Content-Length", "Connection", "Keep-Alive", "Transfer-Encoding", "Trailer", "Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "Grpc-Encoding", "Grpc-Accept-Encoding":
			continue
		}
		dst[k] = v
	}
	for _, k := range info.respRemove {
		delete(dst, k)
	}
}

// grpcStatus is the call's outcome from the trailers, or the headers of a trailers-only answer.
func grpcStatus(resp *http.Response) (code int, msg string, details []byte, ok bool) {
	h := resp.Trailer
	if h.Get("Grpc-Status") == "" {
		h = resp.Header
	}
	s := h.Get("Grpc-Status")
	if s == "" {
		return 0, "", nil, false
	}
	code, err := strconv.Atoi(s)
	if err != nil {
		return 2, "", nil, true // UNKNOWN
	}
	msg, _ = url.PathUnescape(h.Get("Grpc-Message")) // percent-encoded on the wire
	if d := h.Get("Grpc-Status-Details-Bin"); d != "" {
		details, _ = base64.RawStdEncoding.DecodeString(strings.TrimRight(d, "="))
	}
	return code, msg, details, true
}

// readFrame reads one gRPC message; io.EOF at a clean end of the stream.
func readFrame(r io.Reader, limit int) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if hdr[0] != 0 {
		return nil, errors.New("compressed gRPC message (no grpc-encoding was offered)")
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if int(n) > limit {
		return nil, errResponseTooLarge
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, io.ErrUnexpectedEOF
	}
	return buf, nil
}

// statusReply answers a gRPC error: its HTTP status and the google.rpc.Status as JSON.
func statusReply(w http.ResponseWriter, tc *transcoderConfig, code int, msg string, details []byte) {
	j := tc.codec.Status(code, msg, details)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(j)))
	w.WriteHeader(transcode.HTTPStatus(code))
	_, _ = w.Write(j)
}

// transcodeUnary: one message, then the status; the answer goes out whole with its length, as
// Envoy buffers it, with grpc-status: 0 on success (the trailer Envoy folds into the headers).
func (dp *DataPlane) transcodeUnary(w http.ResponseWriter, resp *http.Response, tc *transcoderConfig, b *transcode.Binding, info *proxyInfo) {
	copyHeaders(w.Header(), resp.Header, info)
	data, rerr := readFrame(resp.Body, tc.maxMessage)
	if rerr == nil {
		_, rerr = io.Copy(io.Discard, resp.Body) // to the trailers
	}
	if rerr == errResponseTooLarge {
		info.flags = "UPE"
		for k := range w.Header() {
			delete(w.Header(), k)
		}
		localReply(w, http.StatusInternalServerError, rerr.Error())
		return
	}
	code, msg, details, ok := grpcStatus(resp)
	switch {
	case ok && code != 0:
		statusReply(w, tc, code, msg, details)
		return
	case rerr != nil && rerr != io.EOF || !ok:
		dp.log.Debug("transcoded call ended badly", "cluster", info.cluster.name, "method", b.GRPCPath, "error", rerr)
		info.flags = "UPE"
		statusReply(w, tc, 13, "upstream sent an incomplete gRPC response", nil)
		return
	}
	if data == nil {
		data = []byte{} // a status OK without a message: the empty message
	}
	j, err := tc.codec.Response(b, data)
	if err != nil {
		statusReply(w, tc, 13, err.Error(), nil)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Grpc-Status", "0")
	h.Set("Content-Length", strconv.Itoa(len(j)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(j)
}

// transcodeStream: a server stream is one JSON array, each message written as it arrives.
func (dp *DataPlane) transcodeStream(w http.ResponseWriter, resp *http.Response, tc *transcoderConfig, b *transcode.Binding, info *proxyInfo) {
	copyHeaders(w.Header(), resp.Header, info)
	flusher, _ := w.(http.Flusher)
	started := false
	for {
		data, err := readFrame(resp.Body, tc.maxMessage)
		if err != nil {
			code, msg, details, ok := grpcStatus(resp)
			if !started {
				if ok && code != 0 {
					statusReply(w, tc, code, msg, details)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusOK)
				_, _ = io.WriteString(w, "[")
				if flusher != nil {
					flusher.Flush() // a stream has no length, even an empty one
				}
			}
			if err != io.EOF || !ok || code != 0 {
				// The status is already sent; like Envoy, end the array and let the client see
				// the call's status in the trailers it can read (HTTP/2) and the log.
				dp.log.Debug("transcoded stream ended with an error", "cluster", info.cluster.name, "method", b.GRPCPath, "code", code, "error", err)
			}
			_, _ = io.WriteString(w, "]")
			return
		}
		j, jerr := tc.codec.Response(b, data)
		if jerr != nil {
			j = []byte("{}")
		}
		if !started {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, "[")
			started = true
		} else {
			_, _ = io.WriteString(w, ",")
		}
		_, _ = w.Write(j)
		if flusher != nil {
			flusher.Flush()
		}
	}
}
