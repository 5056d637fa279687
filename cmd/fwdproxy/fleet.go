package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/fwdproxy/fwdproxy/pkg/admin"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/peers"
)

func init() {
	commands = append(commands, newApplyCmd, newDeleteCmd, newStatusCmd, newKeygenCmd)
}

// adminFlags locate and authenticate to a daemon's admin API: its Unix socket from the config
// file by default, where the caller is known by its user; a TCP URL with a token or a client
// certificate otherwise.
type adminFlags struct {
	config, url, tokenFile, cert, key, ca string
	timeout                               time.Duration
}

func (a *adminFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&a.config, "config", defaultConfig, "daemon config file (for admin.socket, or admin.tokenFile and admin.tls with an http(s) --admin)")
	fs.StringVar(&a.url, "admin", "", "admin API: its Unix socket (a path or unix:PATH), or an http(s):// URL of its TCP listener, e.g. https://10.0.1.5:9180 (default: admin.socket of the config, else "+config.DefaultAdminSocket+")")
	fs.StringVar(&a.tokenFile, "token-file", "", "with an http(s) --admin: file holding the bearer token (default: admin.tokenFile of the config)")
	fs.StringVar(&a.cert, "cert", "", "with an https --admin: client certificate chain (PEM) for an admin API with admin.tls")
	fs.StringVar(&a.key, "key", "", "client private key (PEM)")
	fs.StringVar(&a.ca, "ca", "", "CA bundle that signed the admin API's certificate")
	fs.DurationVar(&a.timeout, "timeout", 30*time.Second, "timeout of each admin API request")
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

const adminHelp = `The admin API is found through the config (admin.socket), or given with --admin: its Unix
socket, or the http(s) URL of its TCP listener with --token-file or --cert/--key/--ca.`

func newApplyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Upsert the services of a catalog file into the fleet, in one request",
		Long: `Upsert the services of a catalog file (services: [...], as in discovery.files) into the
fleet's store of operator entries, in one admin API request: every instance serves them within
seconds. The whole file is checked first, alone and with the entries already there; nothing is
written if any service is refused. Undo with fwdproxy delete -f FILE.

` + adminHelp,
		Example: `  fwdproxy apply -f services.yaml
  generate-services | fwdproxy apply -f -
  fwdproxy apply -f services.yaml --admin https://10.0.1.5:9180 --token-file ~/.fwdproxy-token`,
		Args: noArgs,
	}
	var af adminFlags
	af.register(cmd.Flags())
	file := cmd.Flags().StringP("filename", "f", "", "catalog file to apply (services: [...]); - reads stdin")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if *file == "" {
			return usagef("-f FILE is required: a catalog document with the services to upsert")
		}
		data, err := readInput(*file)
		if err != nil {
			return err
		}
		c, err := af.client()
		if err != nil {
			return err
		}
		applied, changed, err := c.Apply(context.Background(), *file, data)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "applied %d service(s), %d changed: %s\n", len(applied), changed, strings.Join(applied, ", "))
		return nil
	}
	return cmd
}

// readInput reads a file, or stdin for "-".
func readInput(file string) ([]byte, error) {
	if file == "-" {
		return io.ReadAll(io.LimitReader(os.Stdin, admin.MaxBody+1))
	}
	return os.ReadFile(file)
}

func newDeleteCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "delete (HOST... | -f FILE | --all-applied)",
		Short: "Delete operator entries from the fleet, in one request",
		Long: `Delete operator entries (services put in with fwdproxy apply) from the fleet, in one admin
API request: by host, every service of a catalog file (undoing fwdproxy apply -f FILE), or
every operator entry (--all-applied). Discovered services cannot be deleted here; change their
source. Hosts that have no entry are reported, and make the command exit 1.

` + adminHelp,
		Example: `  fwdproxy delete reviews.default.svc.cluster.local ratings.default.svc.cluster.local
  fwdproxy delete -f services.yaml
  fwdproxy delete --all-applied`,
		Args: cobra.ArbitraryArgs,
	}
	var af adminFlags
	af.register(cmd.Flags())
	file := cmd.Flags().StringP("filename", "f", "", "delete the services of this catalog file (- reads stdin)")
	all := cmd.Flags().Bool("all-applied", false, "delete every operator entry of the fleet")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		hosts := args
		switch n := btoi(len(args) > 0) + btoi(*file != "") + btoi(*all); {
		case n == 0:
			return usagef("name what to delete: HOST..., -f FILE or --all-applied")
		case n > 1:
			return usagef("give one of HOST..., -f FILE or --all-applied")
		}
		if *file != "" {
			data, err := readInput(*file)
			if err != nil {
				return err
			}
			if hosts, err = catalogHosts(*file, data); err != nil {
				return err
			}
		}
		c, err := af.client()
		if err != nil {
			return err
		}
		res, err := c.DeleteMany(context.Background(), hosts, *all)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if len(res.Deleted) <= 20 {
			for _, h := range res.Deleted {
				fmt.Fprintf(out, "deleted %s\n", h)
			}
		}
		fmt.Fprintf(out, "deleted %d operator entr%s\n", len(res.Deleted), plural(len(res.Deleted), "y", "ies"))
		if len(res.Missing) > 0 {
			return fmt.Errorf("no operator entry for %s (discovered services cannot be deleted here; change their source)", strings.Join(res.Missing, ", "))
		}
		return nil
	}
	return cmd
}

// catalogHosts are the hosts of a catalog file's services: all that deleting them needs, so a
// file applied earlier is undone even if the rules have changed since (the server normalizes).
func catalogHosts(file string, data []byte) ([]string, error) {
	var doc struct {
		Services []struct {
			Host yaml.Node `yaml:"host"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: %v", file, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var hosts []string
	for i, s := range doc.Services {
		if s.Host.Kind != yaml.ScalarNode || s.Host.Value == "" {
			return nil, fmt.Errorf("%s: services[%d].host: required: the service's host name", file, i)
		}
		hosts = append(hosts, s.Host.Value)
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("%s lists no services (services: [{host: ...}, ...])", file)
	}
	return hosts, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func newStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show this instance and the fleet: readiness, identity, every service's state, members",
		Long: `Show this instance and the fleet: readiness, the identity and its expiry, every service of
the catalog with its state (served, or skipped and why), and with gossip the members, their
configuration digests and whether they have converged (exit 1 when not).

` + adminHelp,
		Example: `  fwdproxy status
  fwdproxy status -o json | jq -r '.services[] | select(.state == "skipped") | .host'
  fwdproxy status --config /tmp/fwdproxy-demo/config.yaml -o yaml`,
		Args: noArgs,
	}
	var af adminFlags
	af.register(cmd.Flags())
	output := cmd.Flags().StringP("output", "o", "text", "output format: text, json or yaml")
	asJSON := cmd.Flags().Bool("json", false, "print the status as JSON")
	_ = cmd.Flags().MarkDeprecated("json", "use -o json")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if *asJSON {
			*output = "json"
		}
		if err := oneOf("output", *output, "text", "json", "yaml"); err != nil {
			return err
		}
		c, err := af.client()
		if err != nil {
			return err
		}
		st, err := c.Status(context.Background())
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		switch *output {
		case "json":
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(st); err != nil {
				return err
			}
		case "yaml":
			// The JSON field names, so both outputs read the same to a script.
			j, err := json.Marshal(st)
			if err != nil {
				return err
			}
			var v any
			if err := json.Unmarshal(j, &v); err != nil {
				return err
			}
			enc := yaml.NewEncoder(out)
			enc.SetIndent(2)
			if err := enc.Encode(v); err != nil {
				return err
			}
		default:
			printStatus(out, st, time.Now())
		}
		if !st.Converged {
			if st.Fleet != nil && len(st.Fleet.Problems) > 0 {
				return errors.New("the fleet has not converged: " + strings.Join(st.Fleet.Problems, "; "))
			}
			return errors.New("the fleet has not converged: some members advertise another configuration digest")
		}
		return nil
	}
	return cmd
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
	if len(st.Services) > 0 {
		served := 0
		for _, s := range st.Services {
			if s.State == admin.StateServed {
				served++
			}
		}
		fmt.Fprintf(w, "services:\t%d served, %d skipped\n", served, len(st.Services)-served)
	}
	printKubernetes(w, st.Kubernetes, now)
	if st.Gossip {
		fmt.Fprintf(w, "store:\tdigest %s, %d entries\n", st.Digest, st.Entries)
		fmt.Fprintf(w, "converged:\t%s\n", yesNo(st.Converged))
		if h := st.Fleet; h != nil {
			for _, p := range h.Problems {
				fmt.Fprintf(w, "fleet problem:\t%s\n", p)
			}
		}
	}
	if len(st.Services) > 0 {
		w.Flush()
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "SERVICE\tSTATE\tPORTS\tWHY")
		for _, s := range st.Services {
			ports := make([]string, len(s.Ports))
			for i, p := range s.Ports {
				ports[i] = strconv.FormatUint(uint64(p), 10)
			}
			line := s.Host + "\t" + s.State + "\t" + strings.Join(ports, ",")
			if s.State != admin.StateServed {
				line += "\t" + s.Reason + ": " + s.Detail
			}
			fmt.Fprintln(w, line)
		}
	}
	if st.Gossip {
		w.Flush()
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "MEMBER\tADDRESS\tSTATE\tDIGEST\tSAME\tLEADER")
		for _, m := range st.Members {
			state := m.State
			if state == "" {
				state = "alive"
			}
			if !m.Since.IsZero() {
				state += " for " + now.Sub(m.Since).Round(time.Second).String()
			}
			same := yesNo(m.Digest == st.Digest)
			if m.State == "dead" || m.State == "left" {
				same = "-" // its last digest, not what it holds now
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, state, m.Digest, same, yesNo(m.Leader))
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

func newKeygenCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "keygen",
		Short:   "Print a new random gossip key (a line for the peers.keyring file)",
		Example: `  fwdproxy keygen > /etc/fwdproxy/gossip.keys && chmod 600 /etc/fwdproxy/gossip.keys`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), peers.GenerateKey())
			fmt.Fprintln(cmd.ErrOrStderr(), "# save it on every instance: fwdproxy keygen > /etc/fwdproxy/gossip.keys && chmod 600 /etc/fwdproxy/gossip.keys")
			return nil
		},
	}
}
