package admin

import (
	"crypto/tls"
	"fmt"

	"github.com/fwdproxy/fwdproxy/internal/tlsfiles"
)

// ServerTLS is the admin API's TLS config: its certificate, and client certificates required and
// verified against clientCA.
func ServerTLS(certChain, privateKey, clientCA string) (*tls.Config, error) {
	cfg, err := tlsfiles.Server(certChain, privateKey, clientCA)
	if err != nil {
		return nil, fmt.Errorf("admin.tls: %w", err)
	}
	return cfg, nil
}

// ClientTLS is a CLI's TLS config: its client certificate (optional) and the CA that signed the
// admin API's certificate (optional: the system roots otherwise).
func ClientTLS(certChain, privateKey, serverCA string) (*tls.Config, error) {
	return tlsfiles.Client(certChain, privateKey, serverCA)
}
