package daemon

import (
	"context"
	"fmt"

	"golang.org/x/sync/errgroup"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// startSources runs the discovery sources, each reporting into the daemon's catalog inputs.
func (d *Daemon) startSources(ctx context.Context, g *errgroup.Group) {
	for _, src := range d.sources {
		g.Go(func() error {
			err := src.Run(ctx, func(c *catalog.Catalog) { d.SetCatalog(src.Name(), c) })
			if err != nil && ctx.Err() == nil {
				return fmt.Errorf("discovery %s: %w", src.Name(), err)
			}
			return nil
		})
	}
}
