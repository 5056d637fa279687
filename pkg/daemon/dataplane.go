package daemon

import (
	"context"
	"fmt"
	"os/exec"

	"golang.org/x/sync/errgroup"

	"github.com/fwdproxy/fwdproxy/pkg/dataplane"
	"github.com/fwdproxy/fwdproxy/pkg/envoy"
)

// startDataplane starts what moves the bytes, per the config's dataplane setting: the built-in
// data plane in this process, or a supervised Envoy. Both take their configuration from this
// daemon's xDS server.
func (d *Daemon) startDataplane(ctx context.Context, g *errgroup.Group) error {
	socket := d.cfg.XDSSocket()
	switch d.cfg.Dataplane {
	case "none":
		d.log.Info("no data plane in this process (dataplane: none); serving xDS only", "xds", socket, "node", d.cfg.Node.ID)
	case "envoy":
		bin, err := exec.LookPath(d.cfg.Envoy.Binary)
		if err != nil {
			return fmt.Errorf("envoy.binary: %w", err)
		}
		p := &envoy.Process{
			Binary:        bin,
			BootstrapPath: d.cfg.Envoy.BootstrapPath,
			AdminAddress:  d.cfg.Envoy.AdminAddress,
			DrainTime:     d.cfg.Envoy.DrainTime,
			Args:          d.cfg.Envoy.Args,
			SotW:          d.cfg.Envoy.XDSProtocol == "sotw",
			Log:           d.log.With("component", "envoy"),
		}
		if err := p.WriteBootstrap(d.cfg.Node.ID, d.cfg.Node.Cluster, socket); err != nil {
			return err
		}
		g.Go(func() error { return p.Run(ctx) })
	default:
		o := dataplane.Options{
			ServerAddress: "in-process",
			Dialer:        d.inproc.Dial,
			NodeID:        d.cfg.Node.ID,
			NodeCluster:   d.cfg.Node.Cluster,
			Log:           d.log.With("component", "dataplane"),
			Registerer:    d.Registry,
			DrainTime:     d.cfg.Builtin.DrainTime,
		}
		if d.tuneDataplane != nil {
			d.tuneDataplane(&o)
		}
		dp := dataplane.New(o)
		d.builtin.Store(dp)
		g.Go(func() error { return dp.Run(ctx) })
	}
	return nil
}
