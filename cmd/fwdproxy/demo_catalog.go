package main

import (
	"fmt"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// demoCatalogTemplate is the demo mesh's catalog: Bookinfo-like HTTP services and a TCP echo
// service, reached through the stand-in east-west gateway. Its verbs: %[1]d the HTTP port, %[2]s
// productpage's identity, %[3]s reviews', %[4]d the TCP port, %[5]s echo's, %[6]s the transcoded
// gRPC service's host, %[7]s its identity, %[8]s its gRPC service (descriptor set items.pb, which
// the demo writes beside the catalog).
const demoCatalogTemplate = `# Services of the demo mesh, reached through the stand-in east-west gateway.
services:
  - host: productpage.bookinfo.svc.cluster.local
    aliases: [productpage.example.internal]
    ports: [{number: %[1]d, protocol: http}]
    identities: [%[2]s]
  - host: reviews.bookinfo.svc.cluster.local
    ports: [{number: %[1]d, protocol: http}]
    identities: [%[3]s]
    subsets: [{name: v2, hosts: [reviews-v2.example.internal]}]
  - host: echo.demo.svc.cluster.local
    ports: [{number: %[4]d, protocol: tcp}]
    identities: [%[5]s]
  # A gRPC service that REST/JSON clients call: the fleet transcodes (google.api.http rules).
  - host: %[6]s
    ports: [{number: %[1]d, protocol: grpc}]
    identities: [%[7]s]
    transcoding: {descriptorSet: items.pb, services: [%[8]s]}
`

// demoCatalog is the demo's catalog file for its ports.
func demoCatalog(o demoOptions) string {
	return fmt.Sprintf(demoCatalogTemplate, o.HTTPPort, demoProductpageID, demoReviewsID, o.TCPPort, demoEchoID,
		demoItemsHost, demoItemsID, meshtest.EchoService)
}
