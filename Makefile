# Build, install and test. See README.md.
PREFIX ?= /opt/kata
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build kernel guest virtiofsd managers install deploy-image setup test lint unit bench soak generate fuzz clean

all: build

build:
	$(CARGO) build --release --workspace

# The guest kernel: KERNEL=kata (default) builds the project's own from Debian's linux-source
# and guest/kernel/fragments (cached outside the tree); KERNEL=debian fetches Debian's generic one.
KERNEL ?= kata
kernel:
	KERNEL=$(KERNEL) scripts/guest-kernel.sh

# Both kernels (the project's is the default; Debian's is kept for comparison), the static
# kata-agent and an initrd for each.
guest:
	KERNEL=all scripts/guest-kernel.sh
	scripts/guest-image.sh

virtiofsd:
	scripts/virtiofsd.sh

# The newer container managers the tests run the runtime under (containerd 1.7 from Debian
# trixie, 2.1 from sid, Docker 28 from sid), fetched once into the cache, never installed (scripts/managers.sh).
MANAGERS ?= containerd-1.7 containerd-2.1 docker-28
managers:
	for m in $(MANAGERS); do scripts/managers.sh dir $$m > /dev/null; done

install: build guest virtiofsd
	PREFIX=$(PREFIX) scripts/install.sh

# The kata-deploy image of this build (deploy/kata-deploy.yaml runs it): a docker-archive of
# the installed /opt/kata tree and the installer, tagged kata.local/kata-deploy:$(RELEASE),
# reproducible (same inputs, same digest). Load it on a node: ctr -n k8s.io images import FILE.
RELEASE ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
deploy-image: install
	scripts/deploy-image.sh build/kata-deploy-$(RELEASE).tar $(RELEASE)

# One command: packages, build, guest, /opt/kata, host check.
setup:
	scripts/setup.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	/usr/bin/python3 scripts/check-layers.py
	scripts/check-manifests.sh

# Unit tests only (no root, no QEMU).
unit:
	$(CARGO) test --workspace

# The whole suite: lint, unit tests, and the tests that need root, QEMU and the guest kernel.
test:
	scripts/install-deps.sh
	$(MAKE) managers
	$(MAKE) lint
	$(MAKE) install
	KATA_TEST_KERNEL_DIR=$(CURDIR)/build/kernel $(CARGO) test --workspace -- --include-ignored
	# A short run of the benchmark (3 iterations, every guest: rootfs image, initrd, Debian kernel), so it cannot rot (figures go to /tmp, not the repo).
	/usr/bin/python3 scripts/bench.py --iterations 3 --concurrent 2 --fs-mib 32 --files 200 --bisect-iterations 1 --density 3 \
	  --out /tmp/kata-bench-smoke.json --markdown /tmp/kata-bench-smoke.md --chart /tmp/kata-bench-smoke.png > /dev/null
	/usr/bin/python3 scripts/bench-check.py /tmp/kata-bench-smoke.json /tmp/kata-bench-smoke.png

# Benchmarks kata against runc; writes bench/results.json and BENCHMARKS.md.
bench: install
	/usr/bin/python3 scripts/bench.py

# Fuzz the parsers of untrusted input (seccomp profiles, mount options, annotations,
# configuration text) with cargo-fuzz on the nightly toolchain, FUZZ_SECONDS each (installs
# cargo-fuzz on first use). A crash or a hang fails; its input is left in fuzz/artifacts/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= seccomp mount_options annotations config
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Rewrite the files generated from the configuration schema.
generate:
	KATA_REGENERATE=1 $(CARGO) test -p kata-config --test compat -- generated

clean:
	$(CARGO) clean
	rm -rf build

# The soak-and-fault suite (SOAK_CYCLES cycles, default 100; make test runs 10), a pod's container
# created and removed 50 times with limits (make test: 10), and a container writing 1 GiB to a
# slow reader: bench/soak.json, bench/slow-reader.json, bench/give-back.json and BENCHMARKS.md.
# Each step runs even if an earlier one failed (a missed target is reported, not hidden).
SOAK_CYCLES ?= 100
soak: install
	rc=0; \
	KATA_SOAK_CYCLES=$(SOAK_CYCLES) KATA_SOAK_OUT=$(CURDIR)/bench/soak.json KATA_TEST_KERNEL_DIR=$(CURDIR)/build/kernel \
	  $(CARGO) test -p containerd-shim-kata-v2 --test soak -- --include-ignored --nocapture || rc=1; \
	KATA_TEST_CYCLES=50 KATA_GIVE_BACK_OUT=$(CURDIR)/bench/give-back.json KATA_TEST_KERNEL_DIR=$(CURDIR)/build/kernel \
	  $(CARGO) test -p containerd-shim-kata-v2 --test cri -- --include-ignored --nocapture --exact resources::a_removed_containers_vcpus_and_memory_go_back || rc=1; \
	KATA_TEST_SLOW_READER_MIB=1024 KATA_SLOW_READER_OUT=$(CURDIR)/bench/slow-reader.json KATA_TEST_KERNEL_DIR=$(CURDIR)/build/kernel \
	  $(CARGO) test -p kata-sandbox --test vm -- --include-ignored --nocapture --exact lifecycle::a_slow_reader_holds_the_writer_back_and_loses_nothing || rc=1; \
	/usr/bin/python3 scripts/soak-report.py bench/soak.json bench/slow-reader.json bench/give-back.json BENCHMARKS.md; \
	exit $$rc
