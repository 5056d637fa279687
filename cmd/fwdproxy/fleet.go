package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

func init() {
	register("apply", "upsert the services of a catalog file into the fleet (-f FILE, or - for stdin)", applyCmd)
	register("delete", "delete operator entries from the fleet by host: fwdproxy delete HOST...", deleteCmd)
	register("status", "show this instance and the fleet: members, their configuration digests, convergence, identity expiry, services left out", statusCmd)
	register("keygen", "print a new random gossip key (a line for the peers.keyring file)", keygenCmd)
}

// adminFlags locate and authenticate to a daemon's admin API: its Unix socket from the config
// file by default, where the caller is known by its user; a TCP URL with a token or a client
// certificate otherwise.
type adminFlags struct {
	config, url, tokenFile, cert, key, ca string
	timeout                               time.Duration
}

func (a *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&a.config, "config", "/etc/fwdproxy/config.yaml", "daemon config file (for admin.socket, or admin.tokenFile and admin.tls with an http(s) --admin)")
	fs.StringVar(&a.url, "admin", "", "admin API: its Unix socket (a path or unix:PATH), or an http(s):// URL of its TCP listener, e.g. https://10.0.1.5:9180 (default: admin.socket of the config, else "+config.DefaultAdminSocket+")")
	fs.StringVar(&a.tokenFile, "token-file", "", "with an http(s) --admin: file holding the bearer token (default: admin.tokenFile of the config)")
	fs.StringVar(&a.cert, "cert", "", "with an https --admin: client certificate chain (PEM) for an admin API with admin.tls")
	fs.StringVar(&a.key, "key", "", "client private key (PEM)")
	fs.StringVar(&a.ca, "ca", "", "CA bundle that signed the admin API's certificate")
	fs.DurationVar(&a.timeout, "timeout", 30*time.Second, "request timeout")
}

func (a *adminFlags) client() (*admin.Client, error) {
	target, tokenFile := a.url, a.tokenFile
	cfg, err := config.Load(a.config)
	switch {
	case err == nil:
		if target == "" {
			target = cfg.AdminSocket()
		}
		if tokenFile == "" && cfg.Admin.TokenFile != "" {
			tokenFile = cfg.Path(cfg.Admin.TokenFile)
		}
	case target != "":
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, fs.ErrPermission):
		// No config here, or one this user may not read (an operator in admin.group need not
		// read the daemon's config): the default socket.
		target = config.DefaultAdminSocket
	default:
		return nil, err
	}
	if !strings.HasPrefix(target, "http://") && !strings.HasPrefix(target, "https://") {
		path := strings.TrimPrefix(strings.TrimPrefix(target, "unix:"), "//")
		return &admin.Client{Socket: path, HTTP: &http.Client{Timeout: a.timeout}}, nil
	}
	c := &admin.Client{BaseURL: target}
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, fmt.Errorf("token file: %w", err)
		}
		if c.Token, err = admin.TokenSecret(b); err != nil {
			return nil, fmt.Errorf("token file %s: %w", tokenFile, err)
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if strings.HasPrefix(target, "https://") || a.cert != "" || a.ca != "" {
		tc, err := admin.ClientTLS(a.cert, a.key, a.ca)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = tc
	}
	c.HTTP = &http.Client{Transport: tr, Timeout: a.timeout}
	return c, nil
}

func applyCmd(args []string) error {
	fs := flag.NewFlagSet("apply", flag.ContinueOnError)
	var af adminFlags
	af.register(fs)
	file := fs.String("f", "", "catalog file to apply (services: [...]); - reads stdin")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *file == "" {
		return errors.New("-f FILE is required: a catalog document with the services to upsert")
	}
	var data []byte
	var err error
	if *file == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, admin.MaxBody+1))
	} else {
		data, err = os.ReadFile(*file)
	}
	if err != nil {
		return err
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), af.timeout)
	defer cancel()
	applied, changed, err := c.Apply(ctx, *file, data)
	if err != nil {
		return err
	}
	fmt.Printf("applied %d service(s), %d changed: %s\n", len(applied), changed, strings.Join(applied, ", "))
	return nil
}

func deleteCmd(args []string) error {
	fs := flag.NewFlagSet("delete", flag.ContinueOnError)
	var af adminFlags
	af.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("name the host(s) to delete: fwdproxy delete reviews.default.svc.cluster.local")
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), af.timeout)
	defer cancel()
	var errs []error
	for _, h := range fs.Args() {
		if err := c.Delete(ctx, h); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Printf("deleted %s\n", h)
	}
	return errors.Join(errs...)
}

func statusCmd(args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	var af adminFlags
	af.register(fs)
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), af.timeout)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(os.Stdout, st, time.Now())
	if !st.Converged {
		return errors.New("the fleet has not converged: some members advertise another configuration digest")
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func printStatus(out io.Writer, st *admin.Status, now time.Time) {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	role := "alone (gossip off)"
	if st.Gossip {
		role = "member"
		if st.Leader {
			role = "member, runs discovery"
		}
	}
	fmt.Fprintf(w, "node:\t%s (%s)\n", st.Node, role)
	fmt.Fprintf(w, "ready:\t%s (%s)\n", yesNo(st.Ready), st.ReadyReason)
	if st.ConfigVersion != "" {
		fmt.Fprintf(w, "xds config version:\t%s\n", st.ConfigVersion)
	}
	if id := st.Identity; id != nil {
		left := id.NotAfter.Sub(now).Round(time.Minute)
		when := "in " + left.String()
		if left <= 0 {
			when = "EXPIRED"
		}
		fmt.Fprintf(w, "identity:\t%s, expires %s (%s)\n", id.SPIFFEID, id.NotAfter.UTC().Format(time.RFC3339), when)
	}
	if n := len(st.Skipped); n > 0 {
		noun := "services"
		if n == 1 {
			noun = "service"
		}
		fmt.Fprintf(w, "left out:\t%d %s not in the configuration; every other service is served\n", n, noun)
		for _, s := range st.Skipped {
			fmt.Fprintf(w, "\t%s (%s): %s\n", s.Host, s.Reason, s.Detail)
		}
	}
	printKubernetes(w, st.Kubernetes, now)
	if st.Gossip {
		fmt.Fprintf(w, "store:\tdigest %s, %d entries\n", st.Digest, st.Entries)
		fmt.Fprintf(w, "converged:\t%s\n", yesNo(st.Converged))
		w.Flush()
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "MEMBER\tADDRESS\tDIGEST\tSAME\tLEADER")
		for _, m := range st.Members {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, m.Digest, yesNo(m.Digest == st.Digest), yesNo(m.Leader))
		}
	}
	w.Flush()
}

// printKubernetes prints one line per discovered cluster: connected or failing, and since when.
func printKubernetes(w io.Writer, srcs []admin.KubernetesSource, now time.Time) {
	for _, k := range srcs {
		var state string
		switch {
		case !k.Running:
			state = "not watched by this instance"
		case k.Connected:
			state = fmt.Sprintf("connected since %s (%s)", k.Since.UTC().Format(time.RFC3339), now.Sub(k.Since).Round(time.Second))
		default:
			state = fmt.Sprintf("DISCONNECTED since %s (%s), serving the last good catalog: %s",
				k.Since.UTC().Format(time.RFC3339), now.Sub(k.Since).Round(time.Second), k.LastError)
		}
		fmt.Fprintf(w, "%s:\t%s\n", k.Source, state)
	}
}

func keygenCmd(args []string) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	fmt.Println(peers.GenerateKey())
	fmt.Fprintln(os.Stderr, "# save it on every instance: fwdproxy keygen > /etc/fwdproxy/gossip.keys && chmod 600 /etc/fwdproxy/gossip.keys")
	return nil
}
