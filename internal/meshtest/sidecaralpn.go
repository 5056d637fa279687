package meshtest

// SidecarClientALPN is what an Istio sidecar offers toward an ISTIO_MUTUAL destination:
// istio-http/1.1, istio, http/1.1 on an HTTP/1.1 port (Istio's mtlsHTTP11ALPN) and
// istio-peer-exchange, istio on a TCP port (mtlsTCPWithMxcALPNs: the sidecar's own
// istio.metadata_exchange filter reads the peer's header when istio-peer-exchange is chosen).
func SidecarClientALPN(protocol string) []string {
	if protocol == TCP {
		return []string{"istio-peer-exchange", "istio"}
	}
	return []string{"istio-http/1.1", "istio", "http/1.1"}
}
