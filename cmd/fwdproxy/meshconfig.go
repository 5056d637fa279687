package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/daemon"
	"github.com/fwdproxy/fwdproxy/pkg/meshconfig"
)

func init() { commands = append(commands, newMeshConfigCmd) }

func newMeshConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mesh-config",
		Short: "Print the Istio resources the mesh needs for this fleet (Gateway, AuthorizationPolicy, ServiceEntry)",
		Long: `Prints, as multi-document YAML for kubectl apply, the Istio resources the mesh side needs:
  - Gateway cross-network-gateway: the east-west gateway, port 15443, tls AUTO_PASSTHROUGH
  - AuthorizationPolicy per namespace of the catalog's services, allowing the fleet's principal
  - with --reverse: a ServiceEntry per VM service, pointing at the fleet's load balancer

The reverse file:
  loadBalancer: internal-fwdproxy-0123.elb.eu-west-1.amazonaws.com   # DNS name or IP
  namespace: istio-system      # where the ServiceEntries go (default istio-system)
  exportTo: ["*"]              # default: all namespaces
  services:
    - host: billing.vm.example.internal
      ports: [{number: 8080, protocol: http}, {number: 5432, protocol: tcp, name: postgres}]`,
		Example: `  fwdproxy mesh-config --config /etc/fwdproxy/config.yaml | kubectl apply -f -
  fwdproxy mesh-config --config /etc/fwdproxy/config.yaml --reverse vm-services.yaml`,
		Args: noArgs,
	}
	fs := cmd.Flags()
	path := configFlag(cmd)
	reverse := fs.String("reverse", "", "YAML file of VM services behind the fleet's load balancer, rendered as ServiceEntries")
	gwNS := fs.String("gateway-namespace", "istio-system", "namespace of the east-west gateway")
	policy := fs.String("policy-name", "allow-fwdproxy", "name of each AuthorizationPolicy")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return meshConfig(*path, *reverse, *gwNS, *policy)
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
	if reverse != "" {
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
