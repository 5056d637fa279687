package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls a daemon's admin API, on its Unix socket or over TCP.
type Client struct {
	// Socket is the admin socket's path (admin.socket); when set, BaseURL is not used.
	Socket string
	// BaseURL of a TCP admin API, e.g. https://10.0.1.5:9180 (http:// without admin.tls).
	BaseURL string
	// Token is sent as a bearer token to a TCP admin API.
	Token string
	// HTTP is the client for a TCP admin API; its Timeout bounds each request, on the socket too
	// (default 30 s).
	HTTP *http.Client
}

// where names the API in errors.
func (c *Client) where() string {
	if c.Socket != "" {
		return "unix:" + c.Socket
	}
	return c.BaseURL
}

func (c *Client) httpClient() *http.Client {
	if c.Socket == "" {
		if c.HTTP != nil {
			return c.HTTP
		}
		return &http.Client{Timeout: 30 * time.Second}
	}
	timeout := 30 * time.Second
	if c.HTTP != nil && c.HTTP.Timeout > 0 {
		timeout = c.HTTP.Timeout
	}
	path := c.Socket
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	base := strings.TrimSuffix(c.BaseURL, "/")
	if c.Socket != "" {
		base = "http://fwdproxy-admin" // the socket is the address; the host is a placeholder
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, rd)
	if err != nil {
		return err
	}
	if c.Token != "" && c.Socket == "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if body != nil {
		ct := "application/yaml"
		if json.Valid(body) {
			ct = "application/json"
		}
		req.Header.Set("Content-Type", ct)
	}
	resp, err := c.httpClient().Do(req)
	switch {
	case err != nil && c.Socket != "" && errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("admin API at %s: %w (only root, the daemon's user and members of the group admin.group may use it)", c.where(), err)
	case err != nil && c.Socket != "":
		return fmt.Errorf("admin API at %s: %w (is the daemon running? see admin.socket)", c.where(), err)
	case err != nil:
		return fmt.Errorf("admin API at %s: %w (is the daemon running? see admin.address)", c.where(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e apiError
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s", e.Error)
		}
		return fmt.Errorf("admin API: %s", resp.Status)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// Status returns the instance's and the fleet's state.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Apply upserts the services of a catalog document; name appears in error messages.
func (c *Client) Apply(ctx context.Context, name string, doc []byte) (applied []string, changed int, err error) {
	var out struct {
		Applied []string `json:"applied"`
		Changed int      `json:"changed"`
	}
	err = c.do(ctx, http.MethodPost, "/v1/services?file="+url.QueryEscape(name), doc, &out)
	return out.Applied, out.Changed, err
}

// Delete removes the operator entry for host.
func (c *Client) Delete(ctx context.Context, host string) error {
	return c.do(ctx, http.MethodDelete, "/v1/services/"+url.PathEscape(host), nil, nil)
}

// DeleteMany removes the operator entries of hosts (or, with allApplied, every operator entry) in
// one request.
func (c *Client) DeleteMany(ctx context.Context, hosts []string, allApplied bool) (*DeleteResult, error) {
	body, err := json.Marshal(DeleteRequest{Hosts: hosts, AllApplied: allApplied})
	if err != nil {
		return nil, err
	}
	var out DeleteResult
	return &out, c.do(ctx, http.MethodPost, "/v1/services/delete", body, &out)
}

// Services lists the operator entries as a catalog document (JSON).
func (c *Client) Services(ctx context.Context) ([]byte, error) {
	var raw json.RawMessage
	err := c.do(ctx, http.MethodGet, "/v1/services", nil, &raw)
	return raw, err
}
