// Package tlsfiles builds the TLS configurations of the daemon's TCP listeners that require
// client certificates (the xDS and admin APIs) and of their clients, from PEM files.
package tlsfiles

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// Server is a server's certificate, with client certificates required and verified against
// the CA bundle clientCA.
func Server(certChain, privateKey, clientCA string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certChain, privateKey)
	if err != nil {
		return nil, err
	}
	pool, err := Pool(clientCA)
	if err != nil {
		return nil, fmt.Errorf("clientCA: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}

// Client is a client's certificate (optional) and the CA that signed the server's certificate
// (optional: the system roots otherwise).
func Client(certChain, privateKey, serverCA string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if certChain != "" || privateKey != "" {
		cert, err := tls.LoadX509KeyPair(certChain, privateKey)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if serverCA != "" {
		pool, err := Pool(serverCA)
		if err != nil {
			return nil, fmt.Errorf("server CA: %w", err)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// Pool reads a PEM bundle of CA certificates.
func Pool(path string) (*x509.CertPool, error) {
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

// Identity names a client certificate in logs: its first URI SAN (a SPIFFE ID), else its
// subject's common name, else its serial number.
func Identity(c *x509.Certificate) string {
	if len(c.URIs) > 0 {
		return c.URIs[0].String()
	}
	if c.Subject.CommonName != "" {
		return "CN=" + c.Subject.CommonName
	}
	return "serial " + c.SerialNumber.String()
}
