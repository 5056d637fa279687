package daemon

import (
	"context"

	"github.com/fwdproxy/fwdproxy/internal/filewatch"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// identitySource loads the first identity and returns a function that keeps it current until ctx
// ends, calling SetIdentity on every valid change. A rejected change leaves the last good identity.
func (d *Daemon) identitySource() (*identity.Bundle, func(context.Context) error, error) {
	f := d.cfg.Identity.Files
	files := identity.Files{
		SPIFFEID:   d.cfg.Identity.SPIFFEID,
		CertChain:  d.cfg.Path(f.CertChain),
		PrivateKey: d.cfg.Path(f.PrivateKey),
		Roots:      d.cfg.Path(f.Roots),
	}
	bundle, err := files.Load()
	if err != nil {
		return nil, nil, err
	}
	watch := func(ctx context.Context) error {
		return filewatch.Watch(ctx, files.Paths(), filewatch.Options{}, func() {
			b, err := files.Load()
			if err != nil {
				d.log.Error("identity files rejected; still serving the last good identity", "error", err)
				return
			}
			d.SetIdentity(b)
		})
	}
	return bundle, watch, nil
}
