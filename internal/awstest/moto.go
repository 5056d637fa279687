// Package awstest runs moto_server, an AWS implementation this project did not write, on
// loopback for tests of the AWS calls (ACM PCA, Auto Scaling + EC2, Secrets Manager) and of the
// Terraform module. scripts/test-deps installs it, pinned with hashes, into a virtualenv that
// scripts/moto-path names.
package awstest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
)

// Install is how to get moto_server.
const Install = "install it with `scripts/test-deps` (a pinned, hash-checked virtualenv under ~/.cache/fwdproxy), or set FWDPROXY_MOTO_VENV to a virtualenv holding moto[server] and awscli"

// Region, Account and the static credentials every client in the tests uses: moto accepts any
// credentials and puts resources in its default account.
const (
	Region    = "eu-west-1"
	Account   = "123456789012"
	AccessKey = "AKIDMOTOTESTING"
	SecretKey = "motosecrettestingkey"
)

// RepoRoot is the module's root directory, from this file's location.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var binDir = sync.OnceValues(func() (string, error) {
	out, err := exec.Command(filepath.Join(RepoRoot(), "scripts", "moto-path")).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("moto_server not found (%s): %s", strings.TrimSpace(string(ee.Stderr)), Install)
		}
		return "", fmt.Errorf("moto_server not found (%v): %s", err, Install)
	}
	return strings.TrimSpace(string(out)), nil
})

// BinDir is the virtualenv's bin directory (moto_server, aws), or an error saying how to install
// it. Tests that need it fail with that error; they never skip.
func BinDir() (string, error) { return binDir() }

// Moto is one moto_server process with its own empty state.
type Moto struct {
	// URL is the endpoint every service is reached at, http://127.0.0.1:PORT.
	URL string
	// Bin is the virtualenv's bin directory.
	Bin string
}

var listening = regexp.MustCompile(`Running on (http://127\.0\.0\.1:[0-9]+)`)

// Start runs moto_server on 127.0.0.1 at a free port (port 0: the kernel picks), waits until it
// answers, and stops it when the test ends. env adds moto settings, e.g.
// MOTO_IAM_LOAD_MANAGED_POLICIES=true.
func Start(t testing.TB, env ...string) *Moto {
	t.Helper()
	bin, err := BinDir()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bin, "moto_server"), "-H", "127.0.0.1", "-p", "0")
	cmd.Env = append(Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start moto_server: %v", err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	found := make(chan string, 1)
	var logMu sync.Mutex
	var log strings.Builder
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logMu.Lock()
			if log.Len() < 64<<10 {
				log.WriteString(sc.Text() + "\n")
			}
			logMu.Unlock()
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case found <- m[1]:
				default:
				}
			}
		}
		_ = cmd.Wait()
	}()
	t.Cleanup(func() {
		if t.Failed() {
			logMu.Lock()
			t.Logf("moto_server output:\n%s", log.String())
			logMu.Unlock()
		}
	})
	var url string
	select {
	case url = <-found:
	case <-done:
		logMu.Lock()
		defer logMu.Unlock()
		t.Fatalf("moto_server exited before listening:\n%s", log.String())
	case <-time.After(60 * time.Second):
		t.Fatal("moto_server did not report its address within 60s")
	}
	// Listening is printed before the first request is served; wait for one answer.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/moto-api/", nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("moto_server at %s does not answer: %v", url, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return &Moto{URL: url, Bin: bin}
}

// Env is the environment for AWS clients (SDKs, the aws CLI, Terraform's provider) that talk to
// moto: static credentials and region, no shared files, no instance metadata.
func Env() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + AccessKey, "AWS_SECRET_ACCESS_KEY=" + SecretKey,
		"AWS_REGION=" + Region, "AWS_DEFAULT_REGION=" + Region,
		"AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null", "AWS_EC2_METADATA_DISABLED=true",
	}
}

// Environ is this process's environment without any AWS_ variable (a developer's profile or
// keys must not reach a test), plus Env.
func Environ() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_") {
			out = append(out, kv)
		}
	}
	return append(out, Env()...)
}

// Config is an aws-sdk-go-v2 configuration for moto: static credentials, Region, and every
// service's endpoint at m.URL.
func (m *Moto) Config() aws.Config {
	return aws.Config{
		Region:       Region,
		Credentials:  credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, ""),
		BaseEndpoint: aws.String(m.URL),
	}
}
