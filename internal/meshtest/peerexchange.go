package meshtest

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// Istio's TCP metadata exchange (istio/proxy source/extensions/filters/network/
// metadata_exchange): when a connection negotiates ALPN istio-peer-exchange, each side writes,
// before any application byte, a 4-byte magic, a 4-byte big-endian length and that many bytes of
// a serialized google.protobuf.Any holding a google.protobuf.Struct of its node's metadata.
const (
	// PeerExchangeALPN is the ALPN that turns the exchange on.
	PeerExchangeALPN = "istio-peer-exchange"
	// PeerExchangeMagic starts the header.
	PeerExchangeMagic = 0x3D230467
)

// PeerExchangeHeader is the header a sidecar writes for metadata (e.g. NAME, NAMESPACE).
func PeerExchangeHeader(metadata map[string]string) ([]byte, error) {
	fields := map[string]any{}
	for k, v := range metadata {
		fields[k] = v
	}
	st, err := structpb.NewStruct(fields)
	if err != nil {
		return nil, err
	}
	a, err := anypb.New(st)
	if err != nil {
		return nil, err
	}
	body, err := proto.MarshalOptions{Deterministic: true}.Marshal(a)
	if err != nil {
		return nil, err
	}
	out := binary.BigEndian.AppendUint32(nil, PeerExchangeMagic)
	out = binary.BigEndian.AppendUint32(out, uint32(len(body)))
	return append(out, body...), nil
}

// ReadPeerExchange reads one header as Istio's filter does and returns the peer's metadata.
func ReadPeerExchange(r *bufio.Reader) (*structpb.Struct, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if m := binary.BigEndian.Uint32(hdr[:4]); m != PeerExchangeMagic {
		return nil, fmt.Errorf("metadata exchange: magic %#x, want %#x", m, PeerExchangeMagic)
	}
	n := binary.BigEndian.Uint32(hdr[4:])
	if n > 1<<20 {
		return nil, fmt.Errorf("metadata exchange: %d bytes announced", n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	a := &anypb.Any{}
	if err := proto.Unmarshal(body, a); err != nil {
		return nil, err
	}
	st := &structpb.Struct{}
	if err := a.UnmarshalTo(st); err != nil {
		return nil, errors.New("metadata exchange: the Any holds " + a.GetTypeUrl() + ", not a Struct")
	}
	return st, nil
}

// sidecarMetadata is what a stand-in sidecar says of itself in the exchange.
func sidecarMetadata(name string) map[string]string {
	return map[string]string{"NAME": name, "NAMESPACE": "bookinfo", "WORKLOAD_NAME": name, "CLUSTER_ID": "Kubernetes"}
}
