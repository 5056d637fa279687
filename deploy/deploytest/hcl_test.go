// Package deploytest checks the deployment artefacts: the Packer image (images/packer), the
// Terraform module (deploy/asg) and the observability files (deploy/observability). Every test
// re-reads the files, so a change to any of them is checked on the next run.
package deploytest

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/hashicorp/hcl/v2/hclwrite"
	"github.com/zclconf/go-cty/cty"
)

const (
	asgDir     = "../asg"
	packerDir  = "../../images/packer"
	obsDir     = "../observability"
	repoRoot   = "../.."
	promtoolPk = "prometheus" // the Debian package that ships promtool
)

// hclFiles lists the files under dir whose names end in one of exts, recursively.
func hclFiles(t *testing.T, dir string, exts ...string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && strings.HasPrefix(d.Name(), ".") && path != dir {
			return filepath.SkipDir // .terraform and the like
		}
		for _, ext := range exts {
			if !d.IsDir() && strings.HasSuffix(path, ext) {
				out = append(out, path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatalf("no %v files under %s", exts, dir)
	}
	return out
}

// parseHCL parses one native-syntax HCL file, failing the test with file:line diagnostics.
func parseHCL(t *testing.T, path string) *hclsyntax.Body {
	t.Helper()
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, diags := hclparse.NewParser().ParseHCL(src, path)
	if diags.HasErrors() {
		t.Fatalf("%s does not parse: %s", path, diags.Error())
	}
	return f.Body.(*hclsyntax.Body)
}

// module is the blocks of all HCL files in one folder (not its subfolders), as Terraform and
// Packer see a configuration.
type module struct {
	blocks []*hclsyntax.Block
	files  map[string]*hclsyntax.Body
}

func loadModule(t *testing.T, dir, ext string) *module {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, "*"+ext))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no %s files in %s (%v)", ext, dir, err)
	}
	m := &module{files: map[string]*hclsyntax.Body{}}
	for _, p := range paths {
		b := parseHCL(t, p)
		m.files[p] = b
		m.blocks = append(m.blocks, b.Blocks...)
	}
	return m
}

// all returns the top-level blocks of a type, e.g. "variable" or "resource".
func (m *module) all(typ string) []*hclsyntax.Block {
	var out []*hclsyntax.Block
	for _, b := range m.blocks {
		if b.Type == typ {
			out = append(out, b)
		}
	}
	return out
}

// find returns the top-level block with the given type and labels, or fails.
func (m *module) find(t *testing.T, typ string, labels ...string) *hclsyntax.Block {
	t.Helper()
	for _, b := range m.all(typ) {
		if slices.Equal(b.Labels, labels) {
			return b
		}
	}
	t.Fatalf("no %s %v block", typ, labels)
	return nil
}

// nested returns the first nested block of a type inside b, or fails.
func nested(t *testing.T, b *hclsyntax.Block, typ string) *hclsyntax.Block {
	t.Helper()
	for _, n := range b.Body.Blocks {
		if n.Type == typ {
			return n
		}
	}
	t.Fatalf("%s %v has no %s block", b.Type, b.Labels, typ)
	return nil
}

// literal evaluates an attribute that must be a constant (no variables or functions).
func literal(t *testing.T, b *hclsyntax.Block, name string) cty.Value {
	t.Helper()
	a, ok := b.Body.Attributes[name]
	if !ok {
		t.Fatalf("%s %v: no attribute %s", b.Type, b.Labels, name)
	}
	v, diags := a.Expr.Value(nil)
	if diags.HasErrors() {
		t.Fatalf("%s %v: %s is not a constant: %s", b.Type, b.Labels, name, diags.Error())
	}
	return v
}

// source returns an attribute's expression as written.
func source(t *testing.T, path string, b *hclsyntax.Block, name string) string {
	t.Helper()
	a, ok := b.Body.Attributes[name]
	if !ok {
		t.Fatalf("%s %v: no attribute %s", b.Type, b.Labels, name)
	}
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r := a.Expr.Range()
	return string(src[r.Start.Byte:r.End.Byte])
}

// traversals lists every variable reference (var.x, local.y, aws_lb.this...) in a body.
func traversals(body *hclsyntax.Body) []hcl.Traversal {
	var out []hcl.Traversal
	_ = hclsyntax.VisitAll(body, func(n hclsyntax.Node) hcl.Diagnostics {
		if e, ok := n.(hclsyntax.Expression); ok {
			if _, isScope := n.(*hclsyntax.ScopeTraversalExpr); isScope {
				out = append(out, e.Variables()...)
			}
		}
		return nil
	})
	return out
}

// TestHCLFormat checks canonical formatting of every Terraform and Packer file with hclwrite, and
// the Terraform module with `terraform fmt -check`.
func TestHCLFormat(t *testing.T) {
	files := append(hclFiles(t, asgDir, ".tf"), hclFiles(t, packerDir, ".pkr.hcl")...)
	for _, path := range files {
		src, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := hclwrite.Format(src); !bytes.Equal(got, src) {
			t.Errorf("%s is not canonically formatted; run terraform fmt (or packer fmt) on it", path)
		}
	}
	cmd := exec.Command(terraformBinary(t), "fmt", "-check", "-diff", "-recursive", asgDir)
	cmd.Env = append(os.Environ(), "TF_CLI_CONFIG_FILE=/dev/null", "CHECKPOINT_DISABLE=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("terraform fmt -check %s: %v\n%s", asgDir, err, out)
	}
}

// terraformVersion is the Terraform the suite installs when none is on PATH. It is the last
// MPL-licensed release, it satisfies versions.tf's required_version, and `go install` can build
// it (later releases' go.mod files carry replace directives, which go install refuses).
const terraformVersion = "v1.5.7"

// terraformBinary returns terraform from PATH or, failing that, builds the pinned release once
// into the user's cache directory (else the temporary directory) with `go install` from the Go
// module proxy.
func terraformBinary(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("terraform"); err == nil {
		return p
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir() // no HOME or XDG_CACHE_HOME: build into the temporary directory
	}
	dir := filepath.Join(cache, "fwdproxy-tools", "terraform-"+terraformVersion)
	bin := filepath.Join(dir, "terraform")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	t.Logf("terraform is not on PATH: building %s into %s (once; about a minute)", terraformVersion, dir)
	cmd := exec.Command("go", "install", "github.com/hashicorp/terraform@"+terraformVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("installing terraform %s: %v\n%s\nInstall terraform >= 1.5 on PATH instead.", terraformVersion, err, out)
	}
	return bin
}

// TestHCLParses parses every file of both folders with hcl/v2's native syntax parser.
func TestHCLParses(t *testing.T) {
	for _, path := range append(hclFiles(t, asgDir, ".tf"), hclFiles(t, packerDir, ".pkr.hcl")...) {
		body := parseHCL(t, path)
		if len(body.Blocks) == 0 {
			t.Errorf("%s has no blocks", path)
		}
	}
}
