package admin

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// ServerTLS is the admin API's TLS config: its certificate, and client certificates required and
// verified against clientCA.
func ServerTLS(certChain, privateKey, clientCA string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certChain, privateKey)
	if err != nil {
		return nil, fmt.Errorf("admin.tls: %w", err)
	}
	pool, err := loadPool(clientCA)
	if err != nil {
		return nil, fmt.Errorf("admin.tls.clientCA: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}

// ClientTLS is a CLI's TLS config: its client certificate (optional) and the CA that signed the
// admin API's certificate (optional: the system roots otherwise).
func ClientTLS(certChain, privateKey, serverCA string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if certChain != "" || privateKey != "" {
		cert, err := tls.LoadX509KeyPair(certChain, privateKey)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if serverCA != "" {
		pool, err := loadPool(serverCA)
		if err != nil {
			return nil, fmt.Errorf("server CA: %w", err)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

func loadPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s holds no PEM certificates", path)
	}
	return pool, nil
}
