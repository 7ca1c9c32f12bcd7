# containerd-shim-custom-v2 — `make help` lists the targets.
SHELL := /bin/bash
PREFIX ?= /usr/local
CONTAINERD_CONFIG ?= /etc/containerd/config.toml
CARGO ?= cargo
SHIM := containerd-shim-custom-v2
IMAGE_TAR := target/test-image/shimtest.tar

.PHONY: help deps build release install uninstall demo migrate-demo lazy-demo test unit integration image bench bench-quick lint fmt clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## install what is missing: containerd 2.x, runc, CRIU >= 4.2 (built from Debian source), busybox-static, protoc, docker-registry, checkpointctl
	bash scripts/install-deps.sh

build: ## build the shim (debug, with the test-only switches of src/test_hooks.rs) and container-migrate — what the tests use
	$(CARGO) build -p $(SHIM) --features test-hooks
	$(CARGO) build -p container-migrate

release: ## build the shim (release: no test switches, linked statically) and container-migrate
	CARGO="$(CARGO)" bash scripts/build-release.sh

install: release ## put the shim and container-migrate in PREFIX/bin (/usr/local/bin) and register io.containerd.custom.v2 in CONTAINERD_CONFIG (/etc/containerd/config.toml)
	install -D -m 0755 target/release/$(SHIM) $(DESTDIR)$(PREFIX)/bin/$(SHIM)
	install -D -m 0755 target/release/container-migrate $(DESTDIR)$(PREFIX)/bin/container-migrate
	bash scripts/register-runtime.sh $(CONTAINERD_CONFIG)

uninstall: ## remove the shim and container-migrate from PATH (the config entry stays: remove it by hand)
	rm -f $(DESTDIR)$(PREFIX)/bin/$(SHIM) $(DESTDIR)$(PREFIX)/bin/container-migrate

image: ## build the test images (OCI tars: busybox-static, and the CRI tests' pause image)
	bash scripts/build-test-image.sh $(IMAGE_TAR)
	bash scripts/build-test-image.sh --pause target/test-image/pause.tar

demo: deps install ## the main job: install, build, register, run a container, checkpoint it (live, then exit), restore it, show it continued
	bash scripts/demo.sh

migrate-demo: deps install ## two hosts on this machine (containerds in network namespaces, a registry): a container with memory, files, a volume and a client's TCP connection moved by each path (straight across, archive file, registry), with downtime, total time and bytes per path
	bash scripts/migrate-demo.sh

lazy-demo: deps install ## lazy (post-copy) migration on two hosts: 1 GiB of verified PRNG-filled memory moved A → B the usual way, then B → A lazily (running before its memory arrived), downtime and total side by side
	bash scripts/lazy-demo.sh

unit: ## unit tests of the shim and container-migrate
	$(CARGO) test -p $(SHIM) -p shim-protos -p container-migrate

integration: build image ## integration tests: private containerd + runc + CRIU, through ctr, the Tasks API and the CRI; scenarios run on io.containerd.runc.v2 and io.containerd.custom.v2 alike (checkpoint consistency, hostile input and load on ours)
	SHIMTEST_IMAGE_TAR=$(CURDIR)/$(IMAGE_TAR) $(CARGO) test -p integration --no-fail-fast -- --test-threads=2

test: unit integration ## all tests (needs root and `make deps`)

bench: ## benchmark against containerd's Go runc shim, side by side (results in bench/results/; BENCH_ARGS to pass options)
	bash bench/run.sh $(BENCH_ARGS)

bench-quick: ## the benchmark with fewer rounds and smaller sizes, as a sanity check
	bash bench/run.sh --quick $(BENCH_ARGS)

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p $(SHIM) --all-targets --features test-hooks -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

clean: ## remove build output
	$(CARGO) clean
