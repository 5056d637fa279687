package controlplane

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// Istio's HTTP metadata exchange (istio/proxy source/extensions/filters/http/peer_metadata,
// filter.cc and filter.h; extensions/common/metadata_object.cc and .h): a caller's sidecar sends
// its workload's metadata in two request headers, and the callee's inbound filter (istiod's
// SidecarInboundMetadataFilter: downstream_discovery istio_headers, then workload_discovery)
// decodes them, removes them before the application, and hands the workload to the stats filter,
// which labels istio_requests_total with source_workload, source_canonical_service and the rest.
//
//   - x-envoy-peer-metadata: base64 (standard alphabet, padded: Envoy's Base64::encode; read with
//     Base64::decodeWithoutPadding) of a google.protobuf.Struct serialized deterministically
//     (serializeToStringDeterministic) — a Struct, not an Any as on TCP. Its fields are those of
//     convertWorkloadMetadataToStruct in Istio 1.2x: NAME (the instance, a pod's name), NAMESPACE,
//     WORKLOAD_NAME, CLUSTER_ID, OWNER and LABELS, a Struct holding service.istio.io/canonical-name,
//     service.istio.io/canonical-revision, app and version. The inbound side reads them back with
//     convertStructToWorkloadMetadata.
//   - x-envoy-peer-metadata-id: the sender's Envoy node id, "sidecar~IP~POD.NS~NS.svc.cluster.local";
//     the inbound filter uses it only as the key of a per-worker cache of decoded peers (up to 500
//     entries, never refreshed), so the id must change whenever the metadata does.
//
// The inbound filter also answers with its own two headers when the request carried them
// (downstream_propagation), which fwdproxy removes from the response: they describe the mesh
// workload, and a VM has no use for them.
const (
	HeaderPeerMetadata   = "x-envoy-peer-metadata"
	HeaderPeerMetadataID = "x-envoy-peer-metadata-id"
)

// PeerMetadata is the workload the fleet presents to Istio's telemetry. Every field is a
// validated Kubernetes name or label value (pkg/config); empty optional fields are not sent.
type PeerMetadata struct {
	WorkloadName      string // WORKLOAD_NAME: source_workload
	Namespace         string // NAMESPACE: source_workload_namespace when the SAN has none
	CanonicalService  string // LABELS[service.istio.io/canonical-name]: source_canonical_service
	CanonicalRevision string // LABELS[service.istio.io/canonical-revision]
	App, Version      string // LABELS[app], LABELS[version]: source_app, source_version
	ClusterID         string // CLUSTER_ID: source_cluster
}

// The field and label names of Istio's peer metadata (metadata_object.h).
const (
	mdInstance    = "NAME"
	mdNamespace   = "NAMESPACE"
	mdWorkload    = "WORKLOAD_NAME"
	mdCluster     = "CLUSTER_ID"
	mdLabels      = "LABELS"
	lblCanonical  = "service.istio.io/canonical-name"
	lblRevision   = "service.istio.io/canonical-revision"
	lblApp        = "app"
	lblAppVersion = "version"
)

// fields is the metadata without its instance name.
func (p PeerMetadata) fields() map[string]*structpb.Value {
	labels := map[string]*structpb.Value{}
	for k, v := range map[string]string{lblCanonical: p.CanonicalService, lblRevision: p.CanonicalRevision, lblApp: p.App, lblAppVersion: p.Version} {
		if v != "" {
			labels[k] = structpb.NewStringValue(v)
		}
	}
	f := map[string]*structpb.Value{
		mdNamespace: structpb.NewStringValue(p.Namespace),
		mdWorkload:  structpb.NewStringValue(p.WorkloadName),
		mdLabels:    structpb.NewStructValue(&structpb.Struct{Fields: labels}),
	}
	if p.ClusterID != "" {
		f[mdCluster] = structpb.NewStringValue(p.ClusterID)
	}
	// No OWNER: it names a Kubernetes controller (kubernetes://apis/apps/v1/namespaces/NS/
	// deployments/NAME) and tells only the workload's type, which no standard metric label uses.
	return f
}

func marshalStruct(s *structpb.Struct) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s)
	if err != nil {
		panic(err) // a Struct of strings always marshals
	}
	return b
}

// Headers returns the values of x-envoy-peer-metadata-id and x-envoy-peer-metadata. They are the
// same on every instance (the snapshot is), so the id holds no instance's address (0.0.0.0) and
// the instance name is the workload's name with a hash of the metadata, the way a pod's name
// carries its ReplicaSet's hash: any change to the metadata changes the id a sidecar caches by.
func (p PeerMetadata) Headers() (id, value string, err error) {
	if p.WorkloadName == "" || p.Namespace == "" {
		return "", "", errors.New("peer metadata needs a workload name and a namespace")
	}
	f := p.fields()
	sum := sha256.Sum256(marshalStruct(&structpb.Struct{Fields: f}))
	instance := p.WorkloadName + "-" + hex.EncodeToString(sum[:5])
	f[mdInstance] = structpb.NewStringValue(instance)
	value = base64.StdEncoding.EncodeToString(marshalStruct(&structpb.Struct{Fields: f}))
	id = "sidecar~0.0.0.0~" + instance + "." + p.Namespace + "~" + p.Namespace + ".svc.cluster.local"
	return id, value, nil
}

// peerMetadataHeaders are the route configurations' request_headers_to_add. Envoy's connection
// manager first removes a client's copies (internal_only_headers, for every external request,
// before routing); the router then adds these (finalizeRequestHeaders). OVERWRITE_IF_EXISTS_OR_ADD
// also makes the result fwdproxy's own for a request Envoy deemed internal. The values hold no
// '%', so Envoy's header formatter leaves them as they are.
func peerMetadataHeaders(p *PeerMetadata) ([]*core.HeaderValueOption, error) {
	if p == nil {
		return nil, nil
	}
	id, value, err := p.Headers()
	if err != nil {
		return nil, err
	}
	var out []*core.HeaderValueOption
	for _, h := range [][2]string{{HeaderPeerMetadataID, id}, {HeaderPeerMetadata, value}} {
		out = append(out, &core.HeaderValueOption{
			Header:       &core.HeaderValue{Key: h[0], Value: h[1]},
			AppendAction: core.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	return out, nil
}
