package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
	"github.com/fwdproxy/fwdproxy/pkg/meshconfig"
)

func init() { commands = append(commands, newMeshConfigCmd) }

// reverseFromSection is --reverse's value when given alone: the config's reverse section.
const reverseFromSection = "(config)"

func newMeshConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mesh-config [--reverse | --reverse FILE]",
		Short: "Print the Istio resources the mesh needs for this fleet (Gateway, AuthorizationPolicy, ServiceEntry, DestinationRule)",
		Long: `Prints, as multi-document YAML for kubectl apply, the Istio resources the mesh side needs:
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
      ports: [{number: 8080, protocol: http}, {number: 5432, protocol: tcp, name: postgres}]`,
		Example: `  fwdproxy mesh-config --config /etc/fwdproxy/config.yaml | kubectl apply -f -
  fwdproxy mesh-config --config /etc/fwdproxy/config.yaml --reverse
  fwdproxy mesh-config --config /etc/fwdproxy/config.yaml --reverse vm-services.yaml`,
		Args: cobra.MaximumNArgs(1),
	}
	fs := cmd.Flags()
	path := configFlag(cmd)
	reverse := fs.String("reverse", "", "render the reverse direction: alone, from the config's reverse section; with FILE, from a reverse file")
	fs.Lookup("reverse").NoOptDefVal = reverseFromSection
	gwNS := fs.String("gateway-namespace", "istio-system", "namespace of the east-west gateway")
	policy := fs.String("policy-name", "allow-fwdproxy", "name of each AuthorizationPolicy")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		rev := *reverse
		if len(args) == 1 {
			if rev != reverseFromSection { // only "--reverse FILE" takes an argument
				return usagef("mesh-config: unexpected argument %q (only --reverse takes a file)", args[0])
			}
			rev = args[0]
		}
		return meshConfig(*path, rev, *gwNS, *policy)
	}
	return cmd
}

func meshConfig(path, reverse, gwNS, policy string) error {
	cfg, err := config.Load(path)
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
		GatewayNamespace: gwNS,
		PolicyName:       policy,
	}
	for _, k := range cfg.Discovery.Kubernetes {
		opts.Namespaces = append(opts.Namespaces, k.Namespaces...)
		if len(k.Namespaces) == 0 {
			fmt.Fprintf(os.Stderr, "note: discovery.kubernetes %s watches all namespaces; its services get no AuthorizationPolicy here (list its namespaces to have them rendered)\n", k.Name)
		}
	}
	switch reverse {
	case "":
	case reverseFromSection:
		if opts.Reverse, err = reverseFromConfig(cfg); err != nil {
			return err
		}
	default:
		if opts.Reverse, err = meshconfig.LoadReverse(reverse); err != nil {
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
