package discovery

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/internal/filewatch"
	"github.com/fwdproxy/fwdproxy/internal/meshtest"
	"github.com/fwdproxy/fwdproxy/pkg/catalog"
)

const goodCatalog = `
services:
  - host: a.ns.svc.cluster.local
    ports: [{number: 80, protocol: http}]
    identities: [spiffe://cluster.local/ns/ns/sa/a]
`

func TestFileSourceReloadsAndKeepsLastGood(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "catalog.yaml")
	if err := os.WriteFile(path, []byte(goodCatalog), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs meshtest.SyncBuffer
	src := &File{Path: path, Log: slog.New(slog.NewTextHandler(&logs, nil)),
		Watch: filewatch.Options{Debounce: 20 * time.Millisecond, Poll: 100 * time.Millisecond}}
	updates := make(chan *catalog.Catalog, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(c *catalog.Catalog) { updates <- c }) }()
	defer func() { cancel(); <-done }()

	next := func() *catalog.Catalog {
		select {
		case c := <-updates:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no catalog update")
			return nil
		}
	}
	if c := next(); len(c.Services) != 1 {
		t.Fatalf("first load: %d services", len(c.Services))
	}
	// A bad edit is rejected with a log line naming the problem; nothing is published.
	if err := os.WriteFile(path, []byte(strings.Replace(goodCatalog, "number: 80", "number: 0", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "services[0].ports[0].number: 0 is not a valid port") {
		if time.Now().After(deadline) {
			t.Fatalf("bad edit not reported; logs:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case c := <-updates:
		t.Fatalf("bad catalog published: %+v", c)
	default:
	}
	// So is an edit that leaves no services: only a comment, a null list, a second document.
	// Publishing it would withdraw every service while /ready stays 200.
	for _, edit := range []struct{ doc, want string }{
		{"# moved to the fleet store\n", "the catalog is empty"},
		{"services:\n", "catalog.yaml:1: services is null"},
		{"---\n---\n" + goodCatalog, "catalog.yaml:2: a second YAML document starts here"},
	} {
		if err := os.WriteFile(path, []byte(edit.doc), 0o644); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(logs.String(), edit.want) {
			if time.Now().After(deadline) {
				t.Fatalf("edit %q not reported; logs:\n%s", edit.doc, logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		select {
		case c := <-updates:
			t.Fatalf("edit %q published a catalog of %d services", edit.doc, len(c.Services))
		default:
		}
	}
	// A good edit, written by atomic rename as config tools do, is picked up.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(goodCatalog+`  - host: b.ns.svc.cluster.local
    ports: [{number: 5432, protocol: tcp}]
    identities: [spiffe://cluster.local/ns/ns/sa/b]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	if c := next(); len(c.Services) != 2 {
		t.Fatalf("after fix: %d services", len(c.Services))
	}
}

func TestFileSourceFailsOnBadFirstLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(path, []byte("services: [{host: x}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := (&File{Path: path}).Run(context.Background(), func(*catalog.Catalog) {})
	if err == nil || !strings.Contains(err.Error(), "catalog.yaml:1: services[0].host") {
		t.Fatalf("err = %v", err)
	}
}

func TestMergePriorityAndConflicts(t *testing.T) {
	svc := func(host string, port uint32, proto catalog.Protocol) catalog.Service {
		return catalog.Service{Host: host, Ports: []catalog.Port{{Number: port, Protocol: proto}}, Identities: []string{"spiffe://cluster.local/ns/ns/sa/x"}}
	}
	first := &catalog.Catalog{Services: []catalog.Service{svc("a.ns.svc.cluster.local", 80, catalog.HTTP), svc("db.ns.svc.cluster.local", 5432, catalog.TCP)}}
	second := &catalog.Catalog{Services: []catalog.Service{
		svc("a.ns.svc.cluster.local", 81, catalog.HTTP),                    // shadowed by first
		svc("db2.ns.svc.cluster.local", 5432, catalog.TCP),                 // TCP port collision: left out
		svc("c.ns.svc.cluster.local", 8080, catalog.HTTP),                  // fine
		{Host: "bad", Ports: []catalog.Port{{Number: 1, Protocol: "tcp"}}}, // invalid: left out
	}}
	merged, conflicts := Merge(catalog.Options{}, first, second)
	var hosts []string
	for _, s := range merged.Services {
		hosts = append(hosts, s.Host)
	}
	if strings.Join(hosts, ",") != "a.ns.svc.cluster.local,c.ns.svc.cluster.local,db.ns.svc.cluster.local" {
		t.Fatalf("merged hosts: %v", hosts)
	}
	if merged.Lookup("a.ns.svc.cluster.local").Ports[0].Number != 80 {
		t.Fatal("the earlier source did not win")
	}
	all := ""
	for _, c := range conflicts {
		all += c.Error() + "\n"
	}
	for _, want := range []string{"a.ns.svc.cluster.local is defined by more than one source", "db2.ns.svc.cluster.local left out", "service bad left out"} {
		if !strings.Contains(all, want) {
			t.Errorf("conflicts lack %q:\n%s", want, all)
		}
	}
}

func TestMergeLeavesSourcesUntouched(t *testing.T) {
	src := &catalog.Catalog{Services: []catalog.Service{{
		Host:       "a.ns.svc.cluster.local",
		Aliases:    []string{"z.example.com", "b.example.com"},
		Ports:      []catalog.Port{{Number: 90, Protocol: catalog.HTTP}, {Number: 80, Protocol: catalog.HTTP}},
		Identities: []string{"spiffe://cluster.local/ns/ns/sa/z", "spiffe://cluster.local/ns/ns/sa/a"},
	}}}
	merged, _ := Merge(catalog.Options{}, src)
	if merged.Services[0].Aliases[0] != "b.example.com" || merged.Services[0].Ports[0].Number != 80 {
		t.Fatalf("merged catalog not normalized: %+v", merged.Services[0])
	}
	if src.Services[0].Aliases[0] != "z.example.com" || src.Services[0].Ports[0].Number != 90 || src.Services[0].Identities[0] != "spiffe://cluster.local/ns/ns/sa/z" {
		t.Fatalf("Merge reordered its input in place: %+v", src.Services[0])
	}
}
