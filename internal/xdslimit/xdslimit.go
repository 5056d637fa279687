// Package xdslimit is the one size limit every xDS message between fwdproxy's control plane and
// its data planes keeps to, so that what one end may send the other can always take.
package xdslimit

// MaxMessageBytes bounds one xDS message on both ends of the ADS stream: a whole
// state-of-the-world response of one type (every cluster, say), or a request naming every
// resource of a type. The control plane's gRPC server sends and receives up to it, the built-in
// data plane receives and sends up to it, Envoy's bootstrap states it for its ADS client, and
// the snapshot builder refuses a snapshot with a response above it, so no data plane is ever
// sent a configuration it cannot take.
//
// gRPC's default receive limit, 4 MiB, is reached at about 3,500 services x 2 ports (the
// clusters response); the README's 10,000-service benchmark catalog needs about 10 MB. 1 GiB is
// a hundred times that, and well inside protobuf's 2 GiB limit on one message. gRPC allocates a
// message's buffer only when a message of that size arrives, so the limit costs nothing until
// it is used.
const MaxMessageBytes = 1 << 30
