package meshtest

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// Istio's HTTP metadata exchange as a sidecar's inbound side takes part in it (istio/proxy
// source/extensions/filters/http/peer_metadata/filter.cc, with istiod's
// SidecarInboundMetadataFilter: downstream_discovery istio_headers, downstream_propagation
// istio_headers): x-envoy-peer-metadata is base64 of a serialized google.protobuf.Struct
// (decoded with Envoy's Base64::decodeWithoutPadding), read by convertStructToWorkloadMetadata
// (extensions/common/metadata_object.cc); x-envoy-peer-metadata-id is the caller's node id, a
// cache key. The filter removes both before the application sees the request, and answers a
// caller that sent them with its own (each header only if the caller sent that one).
const (
	PeerMetadataHeader   = "X-Envoy-Peer-Metadata"
	PeerMetadataIDHeader = "X-Envoy-Peer-Metadata-Id"
)

// PeerWorkload is a caller's workload as Istio's inbound filter decodes it, the source_* labels
// of Istio's telemetry.
type PeerWorkload struct {
	Instance, Namespace, Workload, Cluster, Owner string
	CanonicalService, CanonicalRevision           string
	App, Version                                  string
	// Ignored are the fields and labels Istio does not read (LABELS.<name> for a label).
	Ignored []string
}

// String is WORKLOAD_NAME.NAMESPACE, the report's peer field.
func (p PeerWorkload) String() string { return p.Workload + "." + p.Namespace }

// DecodePeerMetadata decodes an x-envoy-peer-metadata value as Istio 1.2x does: base64, padded
// or not; a Struct; NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, OWNER and, in LABELS,
// service.istio.io/canonical-name and -revision, app and version.
func DecodePeerMetadata(value string) (PeerWorkload, error) {
	var p PeerWorkload
	raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(value, "="))
	if err != nil {
		return p, fmt.Errorf("peer metadata: not base64: %w", err)
	}
	var st structpb.Struct
	if err := proto.Unmarshal(raw, &st); err != nil {
		return p, fmt.Errorf("peer metadata: not a google.protobuf.Struct: %w", err)
	}
	for k, v := range st.GetFields() {
		s := v.GetStringValue()
		switch k {
		case "NAME":
			p.Instance = s
		case "NAMESPACE":
			p.Namespace = s
		case "WORKLOAD_NAME":
			p.Workload = s
		case "CLUSTER_ID":
			p.Cluster = s
		case "OWNER":
			p.Owner = s
		case "LABELS":
			for lk, lv := range v.GetStructValue().GetFields() {
				switch lk {
				case "service.istio.io/canonical-name":
					p.CanonicalService = lv.GetStringValue()
				case "service.istio.io/canonical-revision":
					p.CanonicalRevision = lv.GetStringValue()
				case "app":
					p.App = lv.GetStringValue()
				case "version":
					p.Version = lv.GetStringValue()
				default:
					p.Ignored = append(p.Ignored, "LABELS."+lk)
				}
			}
		default:
			p.Ignored = append(p.Ignored, k)
		}
	}
	return p, nil
}

// PeerMetadataValue encodes metadata as a sidecar's x-envoy-peer-metadata: base64 (padded, as
// Envoy's Base64::encode) of the Struct serialized deterministically.
func PeerMetadataValue(metadata map[string]string) (string, error) {
	fields := map[string]any{}
	for k, v := range metadata {
		fields[k] = v
	}
	st, err := structpb.NewStruct(fields)
	if err != nil {
		return "", err
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(st)
	if err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

// sidecarNodeID is a stand-in sidecar's Envoy node id, as Istio's: sidecar~IP~POD.NS~NS.svc.cluster.local.
func sidecarNodeID(name string) string {
	return "sidecar~127.0.0.1~" + name + "-0.bookinfo~bookinfo.svc.cluster.local"
}

// inboundPeerMetadata is what a stand-in's inbound side does with the request headers h, as
// Istio's filter: it takes out the peer metadata headers and sets the sidecar's own on the
// response headers out for each one the caller sent. It returns the report fields: peer (the
// decoded WORKLOAD_NAME.NAMESPACE), peerid and peermetadata (the values received,
// query-escaped).
func inboundPeerMetadata(name string, h, out http.Header) string {
	id, value := h.Get(PeerMetadataIDHeader), h.Get(PeerMetadataHeader)
	h.Del(PeerMetadataIDHeader)
	h.Del(PeerMetadataHeader)
	peer := "-"
	if value != "" {
		if p, err := DecodePeerMetadata(value); err == nil {
			peer = p.String()
		}
		own, err := PeerMetadataValue(sidecarMetadata(name))
		if err == nil {
			out.Set(PeerMetadataHeader, own)
		}
	}
	if id != "" {
		out.Set(PeerMetadataIDHeader, sidecarNodeID(name))
	}
	return fmt.Sprintf("peer=%s peerid=%s peermetadata=%s", peer, url.QueryEscape(id), url.QueryEscape(value))
}
