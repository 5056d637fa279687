package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls a daemon's admin API.
type Client struct {
	// BaseURL, e.g. http://127.0.0.1:9180 (https:// with admin.tls).
	BaseURL string
	Token   string
	HTTP    *http.Client
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.BaseURL, "/")+path, rd)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/yaml")
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("admin API at %s: %w (is the daemon running? see admin.address)", c.BaseURL, err)
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

// Services lists the operator entries as a catalog document (JSON).
func (c *Client) Services(ctx context.Context) ([]byte, error) {
	var raw json.RawMessage
	err := c.do(ctx, http.MethodGet, "/v1/services", nil, &raw)
	return raw, err
}
