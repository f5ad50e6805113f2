# Build, install and test. See README.md.
PREFIX ?= /opt/kata
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build kernel guest virtiofsd install setup test lint unit generate clean

all: build

build:
	$(CARGO) build --release --workspace

kernel:
	scripts/guest-kernel.sh

# The static kata-agent and the initrd (needs the kernel's modules).
guest: kernel
	scripts/guest-image.sh

virtiofsd:
	scripts/virtiofsd.sh

install: build guest virtiofsd
	PREFIX=$(PREFIX) scripts/install.sh

# One command: packages, build, guest, /opt/kata, host check.
setup:
	scripts/setup.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests only (no root, no QEMU).
unit:
	$(CARGO) test --workspace

# The whole suite: lint, unit tests, and the tests that need root, QEMU and the guest kernel.
test:
	scripts/install-deps.sh
	$(MAKE) lint
	$(MAKE) install
	KATA_TEST_KERNEL_DIR=$(CURDIR)/build/kernel $(CARGO) test --workspace -- --include-ignored

# Rewrite the files generated from the configuration schema.
generate:
	KATA_REGENERATE=1 $(CARGO) test -p kata-config --test compat -- generated

clean:
	$(CARGO) clean
	rm -rf build
