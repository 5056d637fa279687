package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
	"github.com/fwdproxy/fwdproxy/pkg/meshconfig"
)

func init() {
	register("mesh-config", "print the Istio resources the mesh needs for this fleet (Gateway, AuthorizationPolicy, ServiceEntry)", meshConfigCmd)
}

func meshConfigCmd(args []string) error {
	fs := flag.NewFlagSet("mesh-config", flag.ContinueOnError)
	path := configFlag(fs)
	reverse := &reverseFlag{}
	fs.Var(reverse, "reverse", "render the reverse direction: alone, from the config's reverse section; =FILE, from a reverse file")
	gwNS := fs.String("gateway-namespace", "istio-system", "namespace of the east-west gateway")
	policy := fs.String("policy-name", "allow-fwdproxy", "name of each AuthorizationPolicy")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: fwdproxy mesh-config --config FILE [--reverse | --reverse FILE]

Prints, as multi-document YAML for kubectl apply, the Istio resources the mesh side needs:
  - Gateway cross-network-gateway: the east-west gateway, port 15443, tls AUTO_PASSTHROUGH
  - AuthorizationPolicy per namespace of the catalog's services, allowing the fleet's principal
  - with --reverse: per VM service of the config's reverse section, a ServiceEntry (the fleet's
    load balancer as endpoint on reverse.loadBalancerPort, subjectAltNames the fleet's identity)
    and a DestinationRule per host with tls.mode ISTIO_MUTUAL

A reverse file (--reverse FILE) lists the same without the daemon's config:
  loadBalancer: internal-fwdproxy-0123.elb.eu-west-1.amazonaws.com   # DNS name or IP
  namespace: istio-system      # where the ServiceEntries go (default istio-system)
  exportTo: ["*"]              # default: all namespaces
  port: 15443                  # the load balancer's port to the fleet's reverse.port
  services:
    - host: billing.vm.example.internal
      ports: [{number: 8080, protocol: http}, {number: 5432, protocol: tcp, name: postgres}]

Flags:`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if reverse.set && reverse.file == "" && fs.NArg() == 1 { // --reverse FILE
		reverse.file = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return fmt.Errorf("mesh-config: unexpected argument %q", fs.Arg(0))
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	merged, conflicts, err := daemon.CatalogFiles(cfg)
	if err != nil {
		return err
	}
	for _, c := range conflicts {
		fmt.Fprintf(os.Stderr, "warning: %v\n", c)
	}
	opts := meshconfig.Options{
		FleetSPIFFEID:    cfg.Identity.SPIFFEID,
		Catalog:          merged,
		GatewayNamespace: *gwNS,
		PolicyName:       *policy,
	}
	for _, k := range cfg.Discovery.Kubernetes {
		opts.Namespaces = append(opts.Namespaces, k.Namespaces...)
		if len(k.Namespaces) == 0 {
			fmt.Fprintf(os.Stderr, "note: discovery.kubernetes %s watches all namespaces; its services get no AuthorizationPolicy here (list its namespaces to have them rendered)\n", k.Name)
		}
	}
	switch {
	case reverse.file != "":
		if opts.Reverse, err = meshconfig.LoadReverse(reverse.file); err != nil {
			return err
		}
	case reverse.set:
		if opts.Reverse, err = reverseFromConfig(cfg); err != nil {
			return err
		}
	}
	out, err := meshconfig.Render(opts)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}

// reverseFlag is --reverse (from the config) or --reverse=FILE / --reverse FILE.
type reverseFlag struct {
	set  bool
	file string
}

func (f *reverseFlag) String() string   { return f.file }
func (f *reverseFlag) IsBoolFlag() bool { return true }
func (f *reverseFlag) Set(v string) error {
	f.set = true
	if v != "true" {
		f.file = v
	}
	return nil
}

// reverseFromConfig is the mesh side of the config's reverse section.
func reverseFromConfig(cfg *config.Config) (*meshconfig.Reverse, error) {
	r := cfg.Reverse
	if !r.Enabled() {
		return nil, fmt.Errorf("mesh-config --reverse: the config has no reverse.services; list the VM services there (see README, Reverse direction) or pass --reverse FILE")
	}
	if r.LoadBalancer == "" {
		return nil, fmt.Errorf("mesh-config --reverse: reverse.loadBalancer is required: the fleet NLB's DNS name or IP, the mesh's endpoint for the VM services")
	}
	out := &meshconfig.Reverse{LoadBalancer: r.LoadBalancer, Namespace: r.Namespace, ExportTo: r.ExportTo, Port: r.LoadBalancerPort}
	for _, s := range r.Services {
		ms := meshconfig.ReverseService{Host: s.Host, Aliases: s.Aliases}
		for _, p := range s.Ports {
			ms.Ports = append(ms.Ports, catalog.Port{Number: p.Number, Protocol: p.Protocol, Name: p.Name})
		}
		out.Services = append(out.Services, ms)
	}
	if err := out.Problems().Err(); err != nil {
		return nil, fmt.Errorf("reverse section: %w", err)
	}
	return out, nil
}
