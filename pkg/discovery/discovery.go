// Package discovery produces catalogs of mesh services from sources: static files (here) and the
// Kubernetes API. Each source reports a whole catalog whenever it changes; the daemon merges them.
package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/fwdproxy/fwdproxy/internal/filewatch"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

// Source reports catalogs. Run calls update with the source's complete catalog each time it
// changes (the first time as soon as it has one) and returns when ctx is done.
type Source interface {
	Name() string
	Run(ctx context.Context, update func(*catalog.Catalog)) error
}

// File is a static catalog file, reloaded when it changes. A bad edit is logged and ignored: the
// last good catalog keeps serving.
type File struct {
	Path    string
	Options catalog.Options
	Log     *slog.Logger
	Watch   filewatch.Options
}

// Name identifies the source in logs and metrics.
func (f *File) Name() string { return "file:" + f.Path }

// Run loads the file and reloads it on change. It fails only if the first load fails, so a daemon
// never starts on a catalog it cannot read.
func (f *File) Run(ctx context.Context, update func(*catalog.Catalog)) error {
	base := filewatch.Take([]string{f.Path})
	c, err := catalog.Load(f.Path, f.Options)
	if err != nil {
		return err
	}
	update(c)
	opts := f.Watch
	opts.Baseline = &base
	return filewatch.Watch(ctx, []string{f.Path}, opts, func() {
		next, err := catalog.Load(f.Path, f.Options)
		if err != nil {
			f.Log.Error("catalog file rejected; still serving the last good catalog", "path", f.Path, "error", err)
			return
		}
		f.Log.Info("catalog file reloaded", "path", f.Path, "services", len(next.Services))
		update(next)
	})
}

// Merge combines catalogs in priority order: a host claimed by an earlier catalog shadows the
// same host in later ones (reported as a conflict, not silently dropped), except one service
// discovered in several clusters, which is merged (multicluster.go). A service whose
// entries are invalid or collide with an earlier one (alias, TCP port) is left out and reported,
// so one bad entry never takes down the rest.
func Merge(opts catalog.Options, cats ...*catalog.Catalog) (*catalog.Catalog, []error) {
	out := &catalog.Catalog{}
	var conflicts []error
	seen := map[string]int{} // host -> index in out.Services
	for _, c := range cats {
		if c == nil {
			continue
		}
		for _, s := range c.Services {
			if i, ok := seen[s.Host]; ok {
				// One service in several clusters (each reached through its own gateway) is one
				// service; anything else is a conflict the first source wins.
				if err := mergeClusters(&out.Services[i], s); err != nil {
					conflicts = append(conflicts, err)
				}
				continue
			}
			seen[s.Host] = len(out.Services)
			// A deep copy: the sources' catalogs are shared, and Normalize sorts in place.
			out.Services = append(out.Services, s.Clone())
		}
	}
	// Collisions are reported on the later of two services, so dropping the reported ones keeps
	// the earlier (higher-priority) entry. Each round removes at least one service.
	checked := false
	for {
		problems := out.Problems(opts)
		if len(problems) == 0 {
			checked = true
			break
		}
		bad := map[int][]string{}
		for _, p := range problems {
			var i int
			if _, err := fmt.Sscanf(p.Field, "services[%d]", &i); err == nil {
				bad[i] = append(bad[i], p.Error())
			}
		}
		if len(bad) == 0 {
			break // not a per-service problem; Translate will refuse it with a clear error
		}
		kept := out.Services[:0:0]
		for i, s := range out.Services {
			if msgs, ok := bad[i]; ok {
				conflicts = append(conflicts, fmt.Errorf("service %s left out: %s", s.Host, strings.Join(msgs, "; ")))
				continue
			}
			kept = append(kept, s)
		}
		out.Services = kept
	}
	out.Normalize()
	// Normalize only sorts and canonicalizes what Problems already compares canonically (names,
	// protocols), so a catalog checked clean stays clean; TestMergerMatchesMerge holds the flag
	// to Problems on the result. A Merger's patch of one changed entry carries it over.
	out.Checked = checked
	return out, conflicts
}
