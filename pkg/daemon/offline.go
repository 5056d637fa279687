package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/fwdproxy/fwdproxy/internal/localsock"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/config"
	"github.com/fwdproxy/fwdproxy/pkg/controlplane"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
	"github.com/fwdproxy/fwdproxy/pkg/gateways"
	"github.com/fwdproxy/fwdproxy/pkg/identity"
)

// Offline gathers what `render` and `validate` translate, without running the daemon: the
// catalog files, a file identity, and the configured gateways resolved now. Errors are bad
// input; notes say what was left out and why (an unresolvable gateway name, sources and
// identities that exist only at run time), so a partial result is never mistaken for the whole.
func Offline(ctx context.Context, cfg *config.Config) (*catalog.Catalog, controlplane.Options, *identity.Bundle, []string, error) {
	var notes []string
	merged, conflicts, err := CatalogFiles(cfg)
	errs := append([]error{err}, conflicts...)
	for _, k := range cfg.Discovery.Kubernetes {
		notes = append(notes, fmt.Sprintf("services discovered from Kubernetes cluster %q are known only at run time and are not included", k.Name))
	}
	var bundle *identity.Bundle
	switch f := cfg.Identity.Files; {
	case f != nil:
		b, err := identity.Files{SPIFFEID: cfg.Identity.SPIFFEID, CertChain: cfg.Path(f.CertChain), PrivateKey: cfg.Path(f.PrivateKey), Roots: cfg.Path(f.Roots)}.Load()
		if err != nil {
			errs = append(errs, fmt.Errorf("identity: %w", err))
		}
		bundle = b
	case cfg.Identity.ACMPCA != nil:
		notes = append(notes, "the identity is issued by AWS Private CA at run time; secrets are not included")
	}
	for _, g := range []struct{ field, name string }{{"xds.group", cfg.XDS.Group}, {"admin.group", cfg.Admin.Group}} {
		if _, err := localsock.LookupGroup(g.name); err != nil {
			notes = append(notes, fmt.Sprintf("%s: %v; the daemon will not start on a host without it (create it: groupadd --system %s)", g.field, err, g.name))
		}
	}
	var gws []controlplane.Gateway
	for _, g := range cfg.Gateways {
		addrs, err := gateways.Resolve(ctx, g.Address, uint16(g.Port))
		if err != nil {
			notes = append(notes, fmt.Sprintf("gateway %s left out: %v", g.Name, err))
			continue
		}
		gws = append(gws, controlplane.Gateway{Name: g.Name, Network: g.Network, Addresses: addrs, Priority: g.Priority})
	}
	return merged, TranslateOptions(cfg, gws), bundle, notes, errors.Join(errs...)
}

// CatalogFiles loads and merges the config's static catalog files: err joins the files that
// could not be loaded, conflicts are the services Merge left out.
func CatalogFiles(cfg *config.Config) (cat *catalog.Catalog, conflicts []error, err error) {
	var cats []*catalog.Catalog
	var errs []error
	for _, f := range cfg.Discovery.Files {
		c, err := catalog.Load(cfg.Path(f), cfg.CatalogOptions())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cats = append(cats, c)
	}
	merged, conflicts := discovery.Merge(cfg.CatalogOptions(), cats...)
	return merged, conflicts, errors.Join(errs...)
}
